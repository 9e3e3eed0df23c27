using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;

namespace LoRAHub.Models.Llama;

/// <summary>One Mixtral expert: w2(silu(w1(x)) · w3(x)). Three Linear fields, so LoRA can target w1, w2, w3 per expert.</summary>
public sealed class MixtralBlockSparseTop2MLP : Module<Tensor, Tensor>
{
    private readonly string activation;
    private Module<Tensor, Tensor> w1, w2, w3;

    public MixtralBlockSparseTop2MLP(LlamaConfig config, ScalarType dtype, Device device) : base(nameof(MixtralBlockSparseTop2MLP))
    {
        activation = config.Activation;
        w1 = Linear(config.HiddenSize, config.IntermediateSize, false, device, dtype);
        w2 = Linear(config.IntermediateSize, config.HiddenSize, false, device, dtype);
        w3 = Linear(config.HiddenSize, config.IntermediateSize, false, device, dtype);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        return w2.call(GatedActivation.Apply(activation, w1.call(x), w3.call(x))).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// Mixtral's sparse MoE feed-forward (transformers' MixtralSparseMoeBlock, registered as block_sparse_moe): the router
/// `gate` scores each token against every expert, the top-k probabilities (softmax in fp32, then renormalised over the k)
/// weight the chosen experts' outputs. Every token reaches all of its k experts (no capacity limit, no dropped tokens).
/// </summary>
public sealed class MixtralSparseMoeBlock : Module<Tensor, Tensor>
{
    private readonly int topK;
    private readonly double jitter;
    private Module<Tensor, Tensor> gate;
    [ComponentName(Name = "experts")] private readonly ModuleList<MixtralBlockSparseTop2MLP> _experts = new();

    public MixtralSparseMoeBlock(LlamaConfig config, ScalarType dtype, Device device) : base(nameof(MixtralSparseMoeBlock))
    {
        topK = config.NumExpertsPerTok;
        jitter = config.RouterJitterNoise;
        gate = Linear(config.HiddenSize, config.NumLocalExperts!.Value, false, device, dtype);
        for (var e = 0; e < config.NumLocalExperts; e++) _experts.append(new MixtralBlockSparseTop2MLP(config, dtype, device));
        RegisterComponents();
    }

    public ModuleList<MixtralBlockSparseTop2MLP> experts => _experts;

    /// <summary>
    /// Where forward adds this call's router logits (tokens × experts), for the load-balancing loss; null: not kept. The
    /// added tensors are outside any dispose scope: whoever set the list disposes them.
    /// </summary>
    public List<Tensor>? RouterLogitsSink { get; set; }

    /// <summary>Top-k routing: the chosen experts (tokens × k) and their weights renormalised to sum to one (fp32).</summary>
    public static (Tensor weights, Tensor experts) Route(Tensor routerLogits, int topK)
    {
        using var scope = NewDisposeScope();
        var probs = nn.functional.softmax(routerLogits.to(ScalarType.Float32), -1);
        var (top, index) = probs.topk(topK, -1);
        var weights = top / top.sum(-1, keepdim: true);
        return (weights.MoveToOuterDisposeScope(), index.MoveToOuterDisposeScope());
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        long hidden = x.size(-1);
        var flat = x.reshape(-1, hidden);
        if (training && jitter > 0) flat = flat * empty_like(flat).uniform_(1.0 - jitter, 1.0 + jitter);
        var logits = gate.call(flat);
        RouterLogitsSink?.Add(logits.alias().DetachFromDisposeScope());
        var (weights, chosen) = Route(logits, topK);
        weights = weights.to(x.dtype);
        var output = zeros_like(flat);
        // One host sync for the whole layer: which experts got any token.
        var counts = chosen.flatten().bincount(null, _experts.Count).cpu().data<long>().ToArray();
        for (var e = 0; e < _experts.Count; e++)
        {
            if (counts[e] == 0) continue;
            var hit = chosen.eq(e);                                  // tokens × k
            var rows = hit.any(-1).nonzero().squeeze(-1);            // tokens routed to e
            var w = (weights * hit.to(weights.dtype)).sum(-1).index_select(0, rows).unsqueeze(-1);
            var y = _experts[e].call(flat.index_select(0, rows)) * w;
            output = output.index_add(0, rows, y.to(output.dtype), 1);
        }
        return output.view(x.shape).MoveToOuterDisposeScope();
    }
}
