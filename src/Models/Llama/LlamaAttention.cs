using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;

namespace LoRAHub.Models.Llama;

/// <summary>
/// Self-attention with rotary embeddings and grouped-query attention; per family also separate or fused (Phi-3 qkv_proj)
/// projections, q/k norms per head (Qwen3, Gemma 3), a sliding window, Gemma's score scale and soft-capping.
/// </summary>
public sealed class LlamaAttention : nn.Module
{
    private readonly int heads, kvHeads, headDim;
    private readonly int? window;
    private readonly double? softcap;
    private readonly double scale;
    private Module<Tensor, Tensor>? q_proj, k_proj, v_proj, qkv_proj;
    private Module<Tensor, Tensor> o_proj;
    private Module<Tensor, Tensor>? q_norm, k_norm;

    public LlamaAttention(LlamaConfig config, int layer, ScalarType dtype, Device device) : base(nameof(LlamaAttention))
    {
        (heads, kvHeads, headDim) = (config.NumAttentionHeads, config.KeyValueHeads, config.HeadDim);
        (window, softcap, scale) = (config.WindowOf(layer), config.AttnLogitSoftcapping, config.AttentionScale);
        int h = config.HiddenSize;
        if (config.Family.FusedProjections)
            qkv_proj = Linear(h, (heads + 2 * kvHeads) * headDim, config.QkvBias, device, dtype);
        else
        {
            q_proj = Linear(h, heads * headDim, config.QkvBias, device, dtype);
            k_proj = Linear(h, kvHeads * headDim, config.QkvBias, device, dtype);
            v_proj = Linear(h, kvHeads * headDim, config.QkvBias, device, dtype);
        }
        o_proj = Linear(heads * headDim, h, config.OutputBias, device, dtype);
        if (config.Family.QkNorm)
        {
            q_norm = GemmaRMSNorm.For(config, headDim, dtype, device);
            k_norm = GemmaRMSNorm.For(config, headDim, dtype, device);
        }
        RegisterComponents();
    }

    /// <summary>The attention window of this layer (null: full causal attention).</summary>
    public int? sliding_window => window;

    public Tensor forward(Tensor x, Tensor cos, Tensor sin, AttentionFunction attention, Tensor? paddingMask, KvCache? cache, int layer)
    {
        using var scope = NewDisposeScope();
        long b = x.size(0), t = x.size(1);
        // Grouped heads: the default attention takes them as they are where SDPA is libtorch's grouped op (no mask); else k/v
        // are repeated (or, with Fused.Gqa, the query heads split into groups). Without a KV cache q and k are rotated (and
        // k, v repeated where they are) in one kernel.
        var masked = (window is int w0 && t > w0) || softcap is not null;
        var defaultAttention = LlamaForCausalLM.IsDefaultAttention(attention);
        var grouped = kvHeads != heads && defaultAttention && paddingMask is null && !masked
            && torchx.nn.functional.scaled_dot_product_attention_takes_gqa;
        var repeatKv = kvHeads != heads && !grouped && !(torchx.nn.functional.Fused.Gqa && defaultAttention);
        var ropeFits = cache == null && (kvHeads == heads || grouped || (repeatKv && !masked));
        // The projections (the fused LoRA q/k/v block where it applies), then the rope kernel or rope ops.
        var (q, k, v, repeated) = ProjectAndRotate(x, cos, sin, ropeFits, repeat: !grouped);
        if (cache != null) (k, v) = cache.Append(layer, k, v);
        long s = k.size(2);
        Tensor y;
        if ((window is int w && s > w) || softcap is not null)
        {
            // The window hides keys (or the scores are capped): an explicit mask, which a replaced attention cannot take.
            if (!defaultAttention)
                throw new NotSupportedException($"this layer uses {(softcap is null ? $"sliding-window attention (window {window}, {s} positions)" : "soft-capped attention scores")}, " +
                    "which a replaced attention function (e.g. LongLoRA's) does not implement; use sequences within the window or the model's own attention");
            y = MaskedAttention.Forward(q, k, v, paddingMask, window, softcap, scale);
        }
        else
        {
            // Attention functions scale by 1/√head_dim; Gemma's 1/√query_pre_attn_scalar is folded into q.
            var defaultScale = 1.0 / Math.Sqrt(headDim);
            if (Math.Abs(scale - defaultScale) > 1e-12 * defaultScale) q = q * (scale / defaultScale);
            // Where the attention does not take grouped heads itself, k/v are expanded to the query's head count (one copy,
            // measured faster than attending per group), by the rope kernel above where it ran.
            if (repeatKv && !repeated)
            {
                // Grouped-query attention: each kv head serves heads/kvHeads query heads.
                var groups = heads / kvHeads;
                k = k.unsqueeze(2).expand(b, kvHeads, groups, s, headDim).reshape(b, heads, s, headDim);
                v = v.unsqueeze(2).expand(b, kvHeads, groups, s, headDim).reshape(b, heads, s, headDim);
            }
            y = attention(q, k, v, paddingMask);
        }
        y = y.transpose(1, 2).reshape(b, t, heads * headDim);
        return (LoraFusion.TryProjection(o_proj, "o_proj", y) ?? o_proj.call(y)).MoveToOuterDisposeScope();
    }

    // q, k, v projected, normed per head where the family does, and rotated (b, heads, t, head_dim); with `repeated`, k and v
    // come repeated to the query's heads by the rope kernel (ropeFits: the caller would repeat them, or leaves them grouped
    // (repeat false: the kernel rotates k and copies v), and has no KV cache).
    private (Tensor q, Tensor k, Tensor v, bool repeated) ProjectAndRotate(Tensor x, Tensor cos, Tensor sin, bool ropeFits, bool repeat)
    {
        long b = x.size(0), t = x.size(1);
        Tensor q, k, v;
        if (qkv_proj is not null)
        {
            var qkv = qkv_proj.call(x);
            q = qkv.narrow(-1, 0, heads * headDim);
            k = qkv.narrow(-1, heads * headDim, kvHeads * headDim);
            v = qkv.narrow(-1, (heads + kvHeads) * headDim, kvHeads * headDim);
        }
        // The fused LoRA q/k/v block where it is exact (torchx.nn.functional.Fused.LoraQkv); it records the path taken.
        else if (LoraFusion.TryQkv(this, q_proj!, k_proj!, v_proj!, x) is { } fused) (q, k, v) = fused;
        else (q, k, v) = (q_proj!.call(x), k_proj!.call(x), v_proj!.call(x));
        q = q.view(b, t, heads, headDim);
        k = k.view(b, t, kvHeads, headDim);
        if (q_norm is not null) (q, k) = (q_norm.call(q), k_norm!.call(k));
        q = q.transpose(1, 2);
        k = k.transpose(1, 2);
        v = v.view(b, t, kvHeads, headDim).transpose(1, 2);
        // Without a KV cache, where k/v get repeated (or need no repeat): one kernel rotates q and k and repeats k, v.
        var repeated = ropeFits && RotaryEmbedding.FusesWithRepeat(q, cos, sin);
        if (repeated) (q, k, v) = torchx.nn.functional.rotary_embedding_gqa(q, k, v, cos, sin, repeat: repeat);
        else
        {
            q = RotaryEmbedding.Apply(q, cos, sin);
            k = RotaryEmbedding.Apply(k, cos, sin);
        }
        return (q, k, v, repeated);
    }
}
