using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using static TorchSharp.torch;

namespace LoRAHub.Models.Llama;

public sealed partial class LlamaForCausalLM
{
    /// <summary>
    /// Which decoder layers are checkpointed, and which of those have their input offloaded to pinned host memory (see
    /// <see cref="TorchExtensions.CheckpointPolicy"/>). Null: <see cref="GradientCheckpointing"/> decides, all layers or none.
    /// </summary>
    public CheckpointPolicy? CheckpointPolicy { get; set; }

    /// <summary>What each decoder layer keeps for backward in this forward (all Keep without grad or with a KV cache).</summary>
    public LayerCheckpoint[] CheckpointPlan(Tensor inputIds, KvCache? cache = null)
    {
        var policy = CheckpointPolicy ?? (GradientCheckpointing ? CheckpointPolicy.All : CheckpointPolicy.None);
        if (!is_grad_enabled() || cache is not null || !policy.Checkpoints) return new LayerCheckpoint[LayerCount];
        // ComputeLoss collects the router logits of every layer for Mixtral's load-balancing loss; a checkpointed layer
        // computes its forward without grad, so that loss would silently get no gradient from it.
        var plan = Plan(policy, inputIds.numel(), inputIds.size(-1));
        if (_model.layers.Any(l => l.moe?.RouterLogitsSink is not null) && plan.Any(p => p != LayerCheckpoint.Keep))
            throw new NotSupportedException($"the router load-balancing loss needs the router logits of the forward pass, which checkpoint policy " +
                $"'{policy}' does not keep: set CheckpointPolicy to none for this MoE model, or router_aux_loss_coef to 0 in config.json");
        return plan;
    }

    // Sizes from the analytic estimate of CheckpointPolicy.DecoderLayerActivationBytes, in the weights' dtype; an MLP that
    // runs this input in token chunks keeps only its input (the layers are alike: the first one's MLP stands for all).
    private LayerCheckpoint[] Plan(CheckpointPolicy policy, long tokens, long positions)
    {
        var element = DType switch
        {
            ScalarType.Float64 => 8L,
            ScalarType.BFloat16 or ScalarType.Float16 => 2L,
            _ => 4L,
        };
        var c = Config;
        var chunked = _model.layers.Count > 0 && _model.layers[0].gated_mlp?.runs_chunked(tokens, positions, element) == true;
        var kept = CheckpointPolicy.DecoderLayerActivationBytes(tokens, c.HiddenSize, (long)c.KeyValueHeads * c.HeadDim, c.IntermediateSize,
            c.NumAttentionHeads, element, mlp_chunked: chunked);
        return policy.Plan(LayerCount, kept, CheckpointPolicy.LayerInputBytes(tokens, c.HiddenSize, element));
    }
}
