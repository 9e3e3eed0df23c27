using LoRAHub.Tuners;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.MALoRA;

using F = TorchSharp.torch.nn.functional;

/// <summary>
/// A Linear with a mixture of asymmetric LoRA experts: y = base(x) + s·Σ_t g_t(x)·B_t·P_t·S·dropout(x). S (shared_rank ×
/// in) is the down-projection all experts share; P_t and B_t are each expert's own; g is a softmax router over the
/// experts, kept for each token's top-k and renormalised. P and B of all experts are stored stacked, so the mixture is
/// three matmuls whatever the number of experts: h = S·x, z = P·h (all experts), y += B·(z ⊙ g).
/// </summary>
public sealed class MaLoraLinear : TunerLayer
{
    private readonly MaLoraOptions options;
    private readonly Linear lora_S, lora_P, lora_B, router;
    private readonly nn.Module<Tensor, Tensor> lora_dropout;

    public MaLoraLinear(nn.Module<Tensor, Tensor> baseLayer, MaLoraOptions options) : base("MaLoraLinear", baseLayer, "MALoRA")
    {
        this.options = options;
        var linear = base_linear;
        var device = linear.weight_device;
        int experts = options.NumExperts, d = options.SharedRank, r = options.ExpertRank;
        // S and P: Kaiming-uniform (as LoRA's A); B = 0, so the layer starts as the base. The router starts near uniform.
        lora_S = nn.Linear(linear.in_features, d, hasBias: false, device: device, dtype: ScalarType.Float32);
        lora_P = nn.Linear(d, experts * r, hasBias: false, device: device, dtype: ScalarType.Float32);
        lora_B = nn.Linear(experts * r, linear.out_features, hasBias: false, device: device, dtype: ScalarType.Float32);
        router = nn.Linear(linear.in_features, experts, hasBias: false, device: device, dtype: ScalarType.Float32);
        lora_dropout = nn.Dropout(options.LoraDropout);
        RegisterComponents();
        using var _ = torch.no_grad();
        B.zero_();
        Router.normal_(0, 0.02);
    }

    public Tensor S => lora_S.weight;
    public Tensor P => lora_P.weight;
    public Tensor B => lora_B.weight;
    public Tensor Router => router.weight;

    /// <summary>Never: routing depends on the input, so the experts cannot be folded into the base weight.</summary>
    public override bool Merged => false;

    public override void Merge() => throw new NotSupportedException("MALoRA's routing depends on the input: its experts cannot be merged into the base weight");

    public override void Unmerge() { }

    /// <summary>The load-balancing term of the last training forward (with its graph), or null.</summary>
    public Tensor? LastBalanceLoss { get; private set; }

    /// <summary>Gate weights (…, experts): softmax of the router, zero outside each token's top-k, renormalised.</summary>
    public Tensor Gates(Tensor input, out Tensor probabilities, out Tensor selected)
    {
        using var scope = torch.NewDisposeScope();
        var probs = F.softmax(F.linear(input.to(ScalarType.Float32), Router), -1);
        // Exactly k experts per token, ties broken by topk's order: mask[e] = e is among the token's top-k indices.
        var top = probs.topk(options.TopK, -1).indexes;
        var experts = torch.arange(0, options.NumExperts, 1, ScalarType.Int64, probs.device);
        var mask = top.unsqueeze(-1).eq(experts).any(-2).to(ScalarType.Float32);
        var kept = probs.mul(mask);
        var gates = kept.div(kept.sum([-1], keepdim: true));
        probabilities = probs.MoveToOuterDisposeScope();
        selected = mask.MoveToOuterDisposeScope();
        return gates.MoveToOuterDisposeScope();
    }

    protected override Tensor AdaptedForward(Tensor input)
    {
        using var scope = torch.NewDisposeScope();
        var result = base_layer.call(input);
        var dtype = input.dtype;
        Tensor Cast(Tensor w) => w.dtype == dtype ? w : w.to(dtype);
        int experts = options.NumExperts, r = options.ExpertRank;

        var gates = Gates(input, out var probs, out var selected);
        var h = F.linear(lora_dropout.call(input), Cast(S));
        var z = F.linear(h, Cast(P));
        var shape = z.shape;
        var expertShape = shape[..^1].Concat(new long[] { experts, r }).ToArray();
        var weighted = z.view(expertShape).mul(gates.to(dtype).unsqueeze(-1)).view(shape);
        var outFeatures = result.size(-1);
        var sum = result.reshape(-1, outFeatures).addmm(weighted.reshape(-1, experts * r), Cast(B).t(), beta: 1, alpha: (float)options.Scaling);

        LastBalanceLoss?.Dispose();
        LastBalanceLoss = null;
        if (training && options.RouterAuxLossCoef > 0)
        {
            // Switch Transformer's balance: experts · Σ_t (share of top-k slots given to t) · (mean probability of t); 1 when uniform.
            var share = selected.reshape(-1, experts).mean([0]).div(options.TopK);
            var meanProb = probs.reshape(-1, experts).mean([0]);
            LastBalanceLoss = share.mul(meanProb).sum().mul(experts).DetachFromDisposeScope();
        }
        return sum.view(result.shape).MoveToOuterDisposeScope();
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            LastBalanceLoss?.Dispose();
            LastBalanceLoss = null;
        }
        base.Dispose(disposing);
    }
}
