using LoRAHub.TorchExtensions;
using static TorchSharp.torch;

namespace LoRAHub.Models.Llama;

/// <summary>Rotary position embeddings as transformers' Llama applies them (rotate_half convention).</summary>
public static class RotaryEmbedding
{
    /// <summary>
    /// inv_freq[i] = 1 / θ^(2i/d) over the rotary dimensions d, with the llama3 or linear scaling when configured. Local
    /// (sliding-window) layers of Gemma 3 pass their own base and no scaling.
    /// </summary>
    public static double[] InverseFrequencies(LlamaConfig config, bool local = false)
    {
        var d = config.RotaryDim;
        var theta = local ? config.SlidingRopeTheta ?? config.RopeTheta : config.RopeTheta;
        var inv = Enumerable.Range(0, d / 2).Select(i => 1.0 / Math.Pow(theta, 2.0 * i / d)).ToArray();
        var s = local ? null : config.RopeScaling;
        switch (s?.Kind)
        {
            case null or "default":
                return inv;
            case "linear":
                return inv.Select(f => f / s.Factor).ToArray();
            case "llama3":
                // Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
                var lowFreqWavelen = s.OriginalMaxPositionEmbeddings / s.LowFreqFactor;
                var highFreqWavelen = s.OriginalMaxPositionEmbeddings / s.HighFreqFactor;
                return inv.Select(f =>
                {
                    var wavelen = 2 * Math.PI / f;
                    if (wavelen < highFreqWavelen) return f;
                    if (wavelen > lowFreqWavelen) return f / s.Factor;
                    var smooth = (s.OriginalMaxPositionEmbeddings / wavelen - s.LowFreqFactor) / (s.HighFreqFactor - s.LowFreqFactor);
                    return (1 - smooth) * f / s.Factor + smooth * f;
                }).ToArray();
            default:
                throw new NotSupportedException($"rope_scaling type '{s.Kind}' is not supported (llama3, linear)");
        }
    }

    private static long tablesBuilt;

    /// <summary>How many times <see cref="Tables"/> has built tables in this process (a model caches them: tests check it does).</summary>
    public static long TablesBuilt => Interlocked.Read(ref tablesBuilt);

    /// <summary>cos and sin tables (positions × rotary dimensions), computed in fp32.</summary>
    public static (Tensor cos, Tensor sin) Tables(LlamaConfig config, int positions, Device device, bool local = false)
    {
        Interlocked.Increment(ref tablesBuilt);
        using var scope = NewDisposeScope();
        var inv = tensor(InverseFrequencies(config, local).Select(x => (float)x).ToArray(), device: device);
        var pos = arange(0, positions, 1, ScalarType.Float32, device);
        var freqs = outer(pos, inv);
        var emb = cat([freqs, freqs], -1);
        return (emb.cos().MoveToOuterDisposeScope(), emb.sin().MoveToOuterDisposeScope());
    }

    /// <summary>
    /// Whether torchx.nn.functional.rotary_embedding_gqa rotates q (batch, heads, seq, head_dim) and k and repeats k, v in
    /// its kernel for these tables: all of head_dim rotates (no partial rotary) and the kernel applies on q's device.
    /// </summary>
    public static bool FusesWithRepeat(Tensor q, Tensor cos, Tensor sin) =>
        cos.size(-1) == q.size(-1) && torchx.nn.functional.rotary_embedding_gqa_is_fused(q, cos, sin);

    /// <summary>
    /// x·cos + rotate_half(x)·sin for x of shape (batch, heads, seq, head_dim); cos/sin (seq, head_dim) in fp32. On CUDA one
    /// fused kernel each way (torchx.nn.functional.Fused.Rope), elsewhere the composite ops with the tables cast to x's dtype.
    /// </summary>
    /// <remarks>
    /// cos/sin may also be (batch, seq, rotary dims), gathered per position (packed rows): the rows are then laid end to
    /// end as one sequence of batch·seq positions (a view of q/k's projection layout), so the same (seq, dim) kernel applies.
    /// </remarks>
    public static Tensor Apply(Tensor x, Tensor cos, Tensor sin)
    {
        if (cos.dim() == 3)
        {
            using var packed = NewDisposeScope();
            long b = x.size(0), h = x.size(1), t = x.size(2), d = x.size(3);
            var rows = x.transpose(1, 2).reshape(1, b * t, h, d).transpose(1, 2);
            var y = Apply(rows, cos.reshape(b * t, -1), sin.reshape(b * t, -1));
            return y.transpose(1, 2).reshape(b, t, h, d).transpose(1, 2).MoveToOuterDisposeScope();
        }
        var rotary = cos.size(-1);
        if (rotary == x.size(-1)) return torchx.nn.functional.rotary_embedding(x, cos, sin);
        // Partial rotary (Phi-3's partial_rotary_factor): the first dimensions rotate, the rest pass through.
        using var scope = NewDisposeScope();
        var rotated = torchx.nn.functional.rotary_embedding(x.narrow(-1, 0, rotary).contiguous(), cos, sin);
        return cat([rotated, x.narrow(-1, rotary, x.size(-1) - rotary)], -1).MoveToOuterDisposeScope();
    }
}
