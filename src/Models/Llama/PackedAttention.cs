using System.Runtime.CompilerServices;
using LoRAHub.TorchExtensions;
using static TorchSharp.torch;

namespace LoRAHub.Models.Llama;

/// <summary>
/// Attention over packed rows as one causal SDPA call per example instead of one masked call per batch. With a boolean
/// mask libtorch cannot use its flash kernel and computes every (query, key) block of a row, across examples and above
/// the diagonal; split by example, each call is plain causal attention (flash on CUDA) over that example only. The split
/// is a view (unbind, split), so backward only concatenates the examples' gradients. Exact: the same attention as the
/// block-diagonal causal mask of <see cref="MaskedAttention.PackedCausalMask"/>.
/// </summary>
public static class PackedAttention
{
    private static readonly ConditionalWeakTable<Tensor, long[][]> segmentsOf = new(), segmentsOfPositions = new();

    /// <summary>
    /// Split per example: null (default) on CUDA only, where it is faster (flash attention); true or false to force it
    /// (tests compare both paths on any device).
    /// </summary>
    public static bool? SplitByExample { get; set; }

    /// <summary>
    /// The examples' lengths per row from (batch, seq) position ids (one host read): a new example starts at position 0
    /// of a row and wherever a position id is not its predecessor's + 1. Remembered for the same tensor (a checkpointed
    /// layer's recomputation asks again in backward).
    /// </summary>
    public static long[][] Segments(Tensor positionIds)
    {
        if (segmentsOfPositions.TryGetValue(positionIds, out var known)) return known;
        using var host = positionIds.to(ScalarType.Int64).cpu();
        var pos = host.data<long>().ToArray();
        long rows = positionIds.size(0), width = positionIds.size(1);
        if (pos.Any(p => p < 0 || p >= width))
            throw new ArgumentException($"packed position ids must lie in [0, {width}) (each example's positions start at 0), got {pos.First(p => p < 0 || p >= width)}");
        var result = new long[rows][];
        for (var r = 0; r < rows; r++)
        {
            var lengths = new List<long>();
            long start = 0;
            for (long t = 1; t <= width; t++)
                if (t == width || pos[r * width + t] != pos[r * width + t - 1] + 1)
                {
                    lengths.Add(t - start);
                    start = t;
                }
            result[r] = lengths.ToArray();
        }
        segmentsOfPositions.AddOrUpdate(positionIds, result);
        return result;
    }

    /// <summary>Notes which examples a packed mask stands for, so that attention can split by example.</summary>
    public static Tensor WithSegments(Tensor mask, long[][] segments)
    {
        segmentsOf.AddOrUpdate(mask, segments);
        return mask;
    }

    /// <summary>The examples of a mask made by <see cref="WithSegments"/> when attention should split by them; else null.</summary>
    public static long[][]? SplitFor(Tensor mask, Tensor query) =>
        (SplitByExample ?? query.device.type == TorchSharp.DeviceType.CUDA) && segmentsOf.TryGetValue(mask, out var s) ? s : null;

    /// <summary>Causal attention per example over (batch, heads, seq, head_dim); k/v may have fewer heads (grouped-query).</summary>
    public static Tensor Forward(Tensor q, Tensor k, Tensor v, long[][] segments, bool gqa)
    {
        using var scope = NewDisposeScope();
        // Every example has its own length: flash attention, never cuDNN's, which builds a graph for each new shape.
        using var noCudnn = torchx.backends.cuda.without_cudnn_sdp(q);
        var (qs, ks, vs) = (q.unbind(0), k.unbind(0), v.unbind(0));
        var rows = new Tensor[segments.Length];
        for (var r = 0; r < segments.Length; r++)
        {
            if (segments[r].Length == 1)
            {
                rows[r] = torchx.nn.functional.scaled_dot_product_attention(qs[r].unsqueeze(0), ks[r].unsqueeze(0), vs[r].unsqueeze(0),
                    is_causal: true, enable_gqa: gqa).squeeze(0);
                continue;
            }
            var (qe, ke, ve) = (qs[r].split(segments[r], 1), ks[r].split(segments[r], 1), vs[r].split(segments[r], 1));
            var outs = new Tensor[segments[r].Length];
            for (var e = 0; e < outs.Length; e++)
                outs[e] = torchx.nn.functional.scaled_dot_product_attention(qe[e].unsqueeze(0), ke[e].unsqueeze(0), ve[e].unsqueeze(0),
                    is_causal: true, enable_gqa: gqa);
            rows[r] = cat(outs, 2).squeeze(0);
        }
        return stack(rows, 0).MoveToOuterDisposeScope();
    }
}
