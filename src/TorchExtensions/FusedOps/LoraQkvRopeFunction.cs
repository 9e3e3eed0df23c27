using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// q/k/v's LoRA updates and DoRA row scales, rotary embedding and grouped-query repeat as one autograd function over the
/// outputs of a deferred <see cref="LoraQkvFunction"/> (its bases and stacked thin product xa), on
/// <see cref="RopeLowRankKernels"/>: pre = c ⊙ (base + s·xa·Bᵀ) per projection, q and k rotated, k and v repeated to the
/// query's heads, one kernel and one rounding each way. Inputs: q, k, v bases (tokens × n, unit column stride), cos, sin
/// (fp32 (T, D) or (B, T, D), unit stride along D), xa (tokens × Σr), B per projection (null: no update), then the row
/// scales' autograd inputs (c, or m for c = m/n; null: none). Outputs: q, k, v as (B, H, T, D) views of (B, T, H, D)
/// memory (k, v with the query's head count), as <see cref="RopeGqaFunction"/> gives them.
/// Backward: the rope kernel's transpose (<see cref="RopeGqaKernels"/>' own for LoRA, where d(inner) = d(pre)) writes
/// d(inner) = c ⊙ d(pre) of q, k, v as column blocks of one
/// (tokens, Nq + Nk + Nv) buffer (the deferred function's dx is then one GEMM) and, for row scales that need their
/// gradient, Σ_tokens d(pre) ⊙ inner with inner recomputed exactly from the saved base (the scale's gradient; m's as
/// dc/n); then dxa = s·d(inner)·B and B's gradient s·d(inner)ᵀ·xa (<see cref="LowRankKernels.StackedBackward"/> where it
/// applies, else GEMMs).
/// </summary>
internal sealed class LoraQkvRopeFunction(IReadOnlyList<LowRankParts> projections, RowScales scales, long seq, long heads,
    long kvHeads, long headDim) : CustomFunction
{
    private const int Cos = 3, Sin = 4, Xa = 5, FirstB = 6, FirstScale = 9;

    private Tensor? cos, sin, xa;
    private readonly Tensor?[] bs = new Tensor?[3], cs = new Tensor?[3], divisors = new Tensor?[3], bases = new Tensor?[3];
    private readonly long[] xaColumns = new long[3];
    private ScalarType dtype;
    private ScalarType[] inputTypes = [];

    protected override string name => "lora_qkv_rope";

    private long Groups => heads / kvHeads;

    private long Heads(int z) => z == 0 ? heads : kvHeads;

    // (B, heads, T, D) over (B, T, heads, D) memory; a tensor of its own, not a view (autograd forbids in-place ops on
    // views created inside a custom function).
    private Tensor Dense(long batch, long h, Device device) =>
        empty_strided([batch, h, seq, headDim], [seq * h * headDim, headDim, h * headDim, 1], dtype, device);

    // Its (tokens, h·D) rows for the kernel.
    private static Tensor Rows(Tensor dense) =>
        dense.as_strided([dense.size(0) * dense.size(2), dense.size(1) * dense.size(3)], [dense.size(1) * dense.size(3), 1]);

    protected override Tensor[] forward(Tensor?[] inputs)
    {
        inputTypes = inputs.Select(t => t?.dtype ?? ScalarType.Float32).ToArray();
        var q = inputs[0]!;
        dtype = q.dtype;
        var tokens = q.size(0);
        var batch = tokens / seq;
        (cos, sin) = (save(inputs[Cos]!), save(inputs[Sin]!));
        var cast = new ForeachCast();
        var b = new Tensor?[3];
        long column = 0;
        for (var z = 0; z < 3; z++)
        {
            xaColumns[z] = column;
            b[z] = cast.To(inputs[FirstB + z], dtype);
            column += b[z]?.size(1) ?? 0;
            if (inputs[FirstScale + z] is not { } input) continue;
            // c's values (the input itself, or for c = m/n the values beside the input m), fp32 for the kernel.
            var c = scales.Values[z] ?? input;
            cs[z] = save(c.dtype == ScalarType.Float32 && c.is_contiguous() ? c : c.to(ScalarType.Float32).contiguous());
            if (scales.Divisors[z] is { } n) divisors[z] = save(n.dtype == ScalarType.Float32 && n.is_contiguous() ? n : n.to(ScalarType.Float32).contiguous());
            // The base, for inner = base + s·xa·Bᵀ recomputed in backward (the memory today's path keeps as the scaled output).
            if (needs_input_grad(FirstScale + z)) bases[z] = save(inputs[z]!);
        }
        cast.Run();
        var xin = inputs[Xa];
        if (xin is not null) xa = save(xin);
        for (var z = 0; z < 3; z++)
            if (b[z] is { } bz) bs[z] = save(bz);
        var outs = new[] { Dense(batch, heads, q.device), Dense(batch, heads, q.device), Dense(batch, heads, q.device) };
        var parts = new RopeLowRankKernels.Part[3];
        for (var z = 0; z < 3; z++)
            parts[z] = new(inputs[z]!, Rows(outs[z]), null, b[z], xaColumns[z], projections[z].Scaling, cs[z], Heads(z), z == 0 ? 1 : Groups);
        RopeLowRankKernels.Forward(parts, xin, cos, sin, seq);
        return outs;
    }

    protected override Tensor?[] backward(Tensor[] grad_outputs)
    {
        var grads = new Tensor?[FirstScale + 3];
        var d0 = grad_outputs[0];
        var tokens = d0.size(0) * d0.size(2);
        var widths = Enumerable.Range(0, 3).Select(z => Heads(z) * headDim).ToArray();
        // d(inner) of q, k, v side by side: one buffer whose column blocks the deferred function's dx GEMM reads as one.
        var dInner = empty([tokens, widths.Sum()], dtype, d0.device);
        var slices = new Tensor[3];
        var parts = new RopeLowRankKernels.Part[3];
        long offset = 0;
        for (var z = 0; z < 3; z++)
        {
            var g = grad_outputs[z];
            if (g.dtype != dtype) g = g.to(dtype);
            if (g.stride(-1) != 1) g = g.contiguous();
            slices[z] = dInner.narrow(1, offset, widths[z]);
            offset += widths[z];
            parts[z] = new(g, slices[z], bases[z], bs[z], xaColumns[z], projections[z].Scaling, cs[z], Heads(z), z == 0 ? 1 : Groups);
        }
        Tensor?[] dc;
        if (parts.All(p => p.Base is null && p.C is null) && RopeGqaKernels.Available(d0))
        {
            // LoRA: d(inner) = d(pre) is the rope kernel's own backward (16-byte accesses; measured at 3.3-3.5 TB/s),
            // written into the column blocks.
            var batch = tokens / seq;
            var views = Enumerable.Range(0, 3).Select(z => slices[z].view(batch, seq, Heads(z), headDim).transpose(1, 2)).ToArray();
            RopeGqaKernels.Gqa(parts[0].In, views[0], parts[1].In, views[1], parts[2].In, views[2], cos!, sin!, heads, kvHeads, Groups,
                backward: true, outTokenStride: widths.Sum());
            dc = new Tensor?[3];
        }
        else dc = RopeLowRankKernels.Backward(parts, xa, cos!, sin!, seq, divisors);
        for (var z = 0; z < 3; z++)
        {
            grads[z] = slices[z];
            if (dc[z] is { } d) grads[FirstScale + z] = d.dtype == inputTypes[FirstScale + z] ? d : d.to(inputTypes[FirstScale + z]);
        }
        if (xa is null) return grads;

        // dxa = s·d(inner)·B and B's gradient s·d(inner)ᵀ·xa per projection with an update.
        var cast = new ForeachCast();
        var updated = Enumerable.Range(0, 3).Where(z => bs[z] is not null).ToArray();
        var xas = updated.Select(z => xa.narrow(1, xaColumns[z], bs[z]!.size(1))).ToArray();
        var stacked = LowRankKernels.StackedBackward(updated.Select((z, n) => new LowRankKernels.Part(slices[z], bs[z]!,
            needs_input_grad(FirstB + z) ? xas[n] : null, projections[z].Scaling,
            inputTypes[FirstB + z] == ScalarType.Float32 ? ScalarType.Float32 : null)).ToList());
        Tensor dxa;
        if (stacked is var (dxaAll, dbs))
        {
            dxa = dxaAll;
            for (var n = 0; n < updated.Length; n++)
                if (dbs[n] is { } db) grads[FirstB + updated[n]] = cast.To(db, inputTypes[FirstB + updated[n]]);
        }
        else
        {
            var dxas = new List<Tensor>();
            for (var n = 0; n < updated.Length; n++)
            {
                var z = updated[n];
                var s = projections[z].Scaling;
                dxas.Add(torchx.mm(slices[z], bs[z]!, s));
                if (needs_input_grad(FirstB + z)) grads[FirstB + z] = cast.To(torchx.mm(slices[z].t(), xas[n], s), inputTypes[FirstB + z]);
            }
            dxa = dxas.Count == 1 ? dxas[0] : cat(dxas, 1);
        }
        cast.Run();
        grads[Xa] = dxa;
        return grads;
    }
}
