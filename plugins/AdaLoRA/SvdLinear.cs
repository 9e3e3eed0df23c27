using LoRAHub.Tuners;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.AdaLoRA;

using F = TorchSharp.torch.nn.functional;

/// <summary>
/// A Linear with an SVD-shaped adapter (PEFT's SVDLinear): y = base(x) + dropout(x)·(A⊙E)ᵀ·Bᵀ · α/(ranknum + 1e-5), with
/// A (r×in) right singular vectors, E (r×1) singular values and B (out×r) left singular vectors. Children follow PEFT
/// (base_layer, lora_A.default, lora_E.default, lora_B.default), so state-dict keys match it.
/// </summary>
public sealed class SvdLinear : DeltaTunerLayer
{
    public const string Adapter = "default";

    // PEFT keeps A, E and B in ParameterDicts: the parameter's path is lora_A.default (no ".weight").
    private readonly ParameterDict lora_A, lora_E, lora_B;
    private readonly nn.Module<Tensor, Tensor> lora_dropout;

    public SvdLinear(nn.Module<Tensor, Tensor> baseLayer, int r, double alpha, double dropout) : base("SVDLinear", baseLayer, "AdaLoRA")
    {
        var linear = base_linear;
        var device = linear.weight_device;
        // PEFT's init: E = 0 (the layer starts as the base), A and B ~ N(0, 0.02).
        lora_A = Holder(torch.randn([r, linear.in_features], device: device).mul_(0.02));
        lora_E = Holder(torch.zeros([r, 1], device: device));
        lora_B = Holder(torch.randn([linear.out_features, r], device: device).mul_(0.02));
        lora_dropout = nn.Dropout(dropout);
        RegisterComponents();
        Rank = r;
        RankNum = r;
        Alpha = alpha;
    }

    private static ParameterDict Holder(Tensor value) => nn.ParameterDict((Adapter, new Parameter(value)));

    public Tensor A => lora_A[Adapter];
    public Tensor E => lora_E[Adapter];
    public Tensor B => lora_B[Adapter];

    /// <summary>Number of triplets (rows of A).</summary>
    public int Rank { get; }

    /// <summary>PEFT's ranknum: the divisor of the scale, the rank the layer was created with.</summary>
    public double RankNum { get; set; }

    public double Alpha { get; }

    public double Scaling => Alpha / (RankNum + 1e-5);


    /// <summary>B·(A⊙E)·scaling (out×in), fp32.</summary>
    public override Tensor DeltaWeight()
    {
        using var scope = torch.NewDisposeScope();
        return B.matmul(A.mul(E)).mul(Scaling).MoveToOuterDisposeScope();
    }

    protected override Tensor AdaptedForward(Tensor input)
    {
        // A layer whose every triplet was pruned (rank 0, as PEFT allows) is the base layer.
        if (Rank == 0) return base_layer.call(input);
        using var scope = torch.NewDisposeScope();
        var result = base_layer.call(input);
        var dtype = input.dtype;
        var ae = A.mul(E);
        var b = B;
        if (ae.dtype != dtype) ae = ae.to(dtype);
        if (b.dtype != dtype) b = b.to(dtype);
        var xa = F.linear(lora_dropout.call(input), ae);
        var outFeatures = result.size(-1);
        var sum = result.reshape(-1, outFeatures).addmm(xa.reshape(-1, xa.size(-1)), b.t(), beta: 1, alpha: (float)Scaling);
        return sum.view(result.shape).MoveToOuterDisposeScope();
    }
}
