using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// Projections of one input through several frozen bases with their low-rank updates (attention's q, k, v), as one
/// autograd function with a hand-derived backward (inputs: x (tokens × hidden), then A, B per projection; null where a
/// projection has no update). All updates read x once through one thin GEMM over the stacked A's; backward gives every A
/// gradient from one GEMM and accumulates dx into one buffer by addmm. Saved: x (when an A needs its gradient) and the
/// thin x·Aᵀ product. On CUDA (bf16/fp16, rank 16: <see cref="LowRankKernels.FasterUpToRank"/>) each projection's
/// dxa = s·dy·B and B gradient s·dyᵀ·xa come from one read of dy (<see cref="LowRankKernels.StackedBackward"/>) instead of
/// two GEMMs (LORAHUB_LOWRANK_KERNEL=0: the GEMMs).
/// After the A's and B's come the projections' row scales c (null where none; DoRA,
/// <see cref="LowRankParts.RowScale"/>): such a projection outputs c ⊙ inner + b with inner = x·Wᵀ + s·(x·Aᵀ)·Bᵀ (scaled
/// in place), and keeps that output when c needs its gradient Σ_tokens dy ⊙ inner, inner recovered as (y − b)/c
/// (<see cref="LowRankParts.RowScaleGrad"/>: exact up to the output's rounding, as DoRA's output kernel does; on CUDA one
/// kernel pass, <see cref="LoraRowScaleKernels.RowScaleBackward"/>).
/// </summary>
internal sealed class LoraQkvFunction(IReadOnlyList<LowRankParts> projections, RowScales? rowScales = null) : CustomFunction
{
    private Tensor? x, aStacked, xa;
    private readonly Tensor?[] bs = new Tensor?[projections.Count];
    private readonly long[] offsets = new long[projections.Count]; // each update's first row in the stacked A
    private readonly Tensor?[] scales = new Tensor?[projections.Count], scaled = new Tensor?[projections.Count]; // c and c ⊙ inner + b
    private readonly Tensor?[] divisors = new Tensor?[projections.Count]; // n of c = m/n (DividedRowScale): the scale input is m
    private ScalarType[] inputTypes = [];

    protected override string name => "lora_qkv";

    private bool NeedsAnyA() => Enumerable.Range(0, projections.Count).Any(i => needs_input_grad(1 + 2 * i));

    protected override Tensor[] forward(Tensor?[] inputs)
    {
        inputTypes = inputs.Select(t => t?.dtype ?? ScalarType.Float32).ToArray();
        var xin = inputs[0]!;
        var dt = xin.dtype;
        var outputs = projections.Select(p => p.InnerForward(xin)).ToArray();
        long offset = 0;
        var withUpdate = new List<int>();
        for (var i = 0; i < projections.Count; i++)
        {
            offsets[i] = offset;
            if (inputs[1 + 2 * i] is not { } a) continue;
            withUpdate.Add(i);
            offset += a.size(0);
        }
        if (withUpdate.Count > 0)
        {
            // The fp32 masters cast by one launch (the A's straight into their stack) where six casts and a cat each
            // launched a small kernel.
            var cast = new ForeachCast();
            var aAll = cast.Stack(withUpdate.Select(i => inputs[1 + 2 * i]!).ToList(), dt);
            var b = new Tensor?[projections.Count];
            foreach (var i in withUpdate) b[i] = cast.To(inputs[2 + 2 * i], dt);
            cast.Run();
            var xaAll = xin.mm(aAll.t());
            foreach (var i in withUpdate)
            {
                var p = projections[i];
                torchx.addmm_(outputs[i], xaAll.narrow(1, offsets[i], p.Rank), b[i]!.t(), 1, p.Scaling);
                bs[i] = save(b[i]!);
            }
            if (NeedsAnyA()) x = save(xin);
            aStacked = save(aAll);
            xa = save(xaAll);
        }
        for (var i = 0; i < projections.Count; i++)
        {
            if (inputs.ElementAtOrDefault(ScaleInput(i)) is not { } input) continue;
            // c's values (the input itself, or for c = m/n the values beside the input m).
            var c = rowScales?.Values[i] ?? input;
            projections[i].ScaleRows_(outputs[i], c);
            scales[i] = save(c);
            if (rowScales?.Divisors[i] is { } n) divisors[i] = save(n);
            // The output itself (the caller does not change it in place), read in backward and never written.
            if (needs_input_grad(ScaleInput(i))) scaled[i] = save(outputs[i]);
        }
        return outputs;
    }

    private int ScaleInput(int projection) => 1 + 2 * projections.Count + projection;

    protected override Tensor?[] backward(Tensor[] grad_outputs)
    {
        var grads = new Tensor?[1 + 3 * projections.Count];
        var dt = aStacked?.dtype ?? projections[0].WeightDtype;
        var dys = grad_outputs.Select(d => d.dtype == dt ? d : d.to(dt)).ToArray();
        Tensor Grad(Tensor t, int input) => t.dtype == inputTypes[input] ? t : t.to(inputTypes[input]);

        // Row scales: y = c ⊙ inner + b, so dc = Σ_tokens dy ⊙ inner and d(inner) = dy ⊙ c (a new tensor: dy is not ours to change).
        for (var i = 0; i < projections.Count; i++)
        {
            if (scales[i] is not { } c) continue;
            var y = needs_input_grad(ScaleInput(i)) ? scaled[i] : null;
            if (LoraRowScaleKernels.AppliesTo(dys[i]))
            {
                // One pass on CUDA.
                (dys[i], var dc) = LoraRowScaleKernels.RowScaleBackward(dys[i], y, c, projections[i].Bias, divisors[i]);
                if (dc is not null) grads[ScaleInput(i)] = Grad(dc, ScaleInput(i));
                continue;
            }
            if (y is not null) grads[ScaleInput(i)] = Grad(projections[i].RowScaleGrad(y, dys[i], c, inPlace: false, divisors[i]), ScaleInput(i));
            dys[i] = dys[i].clone().mul_(c);
        }

        Tensor? dxa = null;
        if (aStacked is not null)
        {
            // The A and B gradients in their masters' dtype, by one launch at the end (a view of the stacked A gradient
            // is copied even without a cast: each gradient owns its memory).
            var cast = new ForeachCast();
            var updated = Enumerable.Range(0, projections.Count).Where(i => projections[i].HasUpdate).ToArray();
            var xas = updated.Select(i => xa!.narrow(1, offsets[i], projections[i].Rank)).ToArray();
            // On CUDA one kernel per projection reads dy once for both thin products (two GEMMs read it twice at a quarter of
            // the bandwidth), writes dxa straight into the stacked buffer and B's gradient in the master's dtype when fp32.
            var stacked = LowRankKernels.StackedBackward(updated.Select((i, n) => new LowRankKernels.Part(dys[i], bs[i]!,
                needs_input_grad(2 + 2 * i) ? xas[n] : null, projections[i].Scaling,
                inputTypes[2 + 2 * i] == ScalarType.Float32 ? ScalarType.Float32 : null)).ToList());
            if (stacked is var (dxaAll, dbs))
            {
                dxa = dxaAll;
                for (var n = 0; n < updated.Length; n++)
                    if (dbs[n] is { } db) grads[2 + 2 * updated[n]] = cast.To(db, inputTypes[2 + 2 * updated[n]]);
            }
            else
            {
                var parts = new List<Tensor>();
                for (var n = 0; n < updated.Length; n++)
                {
                    var i = updated[n];
                    var p = projections[i];
                    parts.Add(torchx.mm(dys[i], bs[i]!, p.Scaling));
                    if (needs_input_grad(2 + 2 * i)) grads[2 + 2 * i] = cast.To(torchx.mm(dys[i].t(), xas[n], p.Scaling), inputTypes[2 + 2 * i]);
                }
                dxa = parts.Count == 1 ? parts[0] : cat(parts, 1);
            }
            if (x is not null)
            {
                // Every A gradient from one GEMM, then split.
                var da = dxa.t().mm(x);
                for (var i = 0; i < projections.Count; i++)
                    if (projections[i].HasUpdate && needs_input_grad(1 + 2 * i))
                        grads[1 + 2 * i] = cast.To(da.narrow(0, offsets[i], projections[i].Rank), inputTypes[1 + 2 * i], copy: true);
            }
            cast.Run();
        }
        if (needs_input_grad(0))
        {
            // dx accumulated into one buffer by addmm: each base, then all updates at once.
            var dx = projections[0].WithWeight(w => dys[0].mm(w));
            for (var i = 1; i < projections.Count; i++) projections[i].WithWeight(w => torchx.addmm_(dx, dys[i], w));
            if (dxa is not null) torchx.addmm_(dx, dxa, aStacked!);
            grads[0] = dx;
        }
        return grads;
    }
}
