using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;

namespace LoRAHub.Models.Llama;

/// <summary>
/// Pre-norm block: x + attn(norm(x)), then + mlp(norm(·)). Gemma's sandwich adds a norm after each (post_attention_layernorm
/// then normalises the attention output, pre/post_feedforward_layernorm wrap the MLP). Mixtral's MLP is block_sparse_moe.
/// With Llama's norm the residual add and post_attention_layernorm run as one op, and input_layernorm's backward adds the
/// residual stream's gradient (torchx.nn.functional.add_rms_norm), and Llama's gated MLP adds its output to the stream
/// itself (<see cref="LlamaMLP.forward_add"/>: in the fused LoRA block's last kernel where it applies).
/// </summary>
public sealed class LlamaDecoderLayer : nn.Module
{
    private readonly LlamaAttention self_attn;
    private Module<Tensor, Tensor>? mlp, block_sparse_moe;
    private Module<Tensor, Tensor> input_layernorm, post_attention_layernorm;
    private Module<Tensor, Tensor>? pre_feedforward_layernorm, post_feedforward_layernorm;

    public LlamaDecoderLayer(LlamaConfig config, int layer, ScalarType dtype, Device device) : base(nameof(LlamaDecoderLayer))
    {
        self_attn = new LlamaAttention(config, layer, dtype, device);
        if (config.Family.MixtureOfExperts) block_sparse_moe = new MixtralSparseMoeBlock(config, dtype, device);
        else if (config.Family.FusedProjections) mlp = new Phi3MLP(config, dtype, device);
        else mlp = new LlamaMLP(config, dtype, device);
        input_layernorm = GemmaRMSNorm.For(config, config.HiddenSize, dtype, device);
        post_attention_layernorm = GemmaRMSNorm.For(config, config.HiddenSize, dtype, device);
        if (config.Family.SandwichNorm)
        {
            pre_feedforward_layernorm = GemmaRMSNorm.For(config, config.HiddenSize, dtype, device);
            post_feedforward_layernorm = GemmaRMSNorm.For(config, config.HiddenSize, dtype, device);
        }
        RegisterComponents();
    }

    public LlamaAttention attention => self_attn;

    /// <summary>Mixtral's routed experts (null for a dense MLP).</summary>
    public MixtralSparseMoeBlock? moe => block_sparse_moe as MixtralSparseMoeBlock;

    /// <summary>The dense MLP when it is Llama's gated one (null for Phi-3's fused MLP, Mixtral's experts or a replacement).</summary>
    public LlamaMLP? gated_mlp => mlp as LlamaMLP;

    public Tensor forward(Tensor x, Tensor cos, Tensor sin, AttentionFunction attention, Tensor? paddingMask, KvCache? cache, int layer)
    {
        using var scope = NewDisposeScope();
        var feedforward = mlp ?? block_sparse_moe!;
        Tensor output;
        if (pre_feedforward_layernorm is null && post_attention_layernorm is TorchExtensions.Modules.RMSNorm norm)
        {
            // Llama's w-form norms: x's norm keeps x's two gradients (its own and the residual stream's) for its backward
            // kernel to add, and h = x + a with its norm is one kernel each way; the same values as the separate ops.
            Tensor stream = x, xn;
            if (input_layernorm is TorchExtensions.Modules.RMSNorm inputNorm)
                (stream, xn) = torchx.nn.functional.add_rms_norm(x, null, inputNorm.weight, inputNorm.eps);
            else
                xn = input_layernorm.call(x);
            var a = self_attn.forward(xn, cos, sin, attention, paddingMask, cache, layer);
            var (h, normed) = torchx.nn.functional.add_rms_norm(stream, a, norm.weight, norm.eps);
            // Llama's gated MLP takes the stream, so that its fused block adds it with down_proj's update in one kernel.
            output = feedforward is LlamaMLP gated && LoraFusion.MlpResidual ? gated.forward_add(normed, h) : h + feedforward.call(normed);
        }
        else if (pre_feedforward_layernorm is null)
        {
            var a = self_attn.forward(input_layernorm.call(x), cos, sin, attention, paddingMask, cache, layer);
            var h = x + a;
            output = h + feedforward.call(post_attention_layernorm.call(h));
        }
        else
        {
            var a = self_attn.forward(input_layernorm.call(x), cos, sin, attention, paddingMask, cache, layer);
            var h = x + post_attention_layernorm.call(a);
            output = h + post_feedforward_layernorm!.call(feedforward.call(pre_feedforward_layernorm.call(h)));
        }
        return output.MoveToOuterDisposeScope();
    }
}
