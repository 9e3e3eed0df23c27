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
/// With dense frozen bases stacked in one storage (<see cref="StackedBases"/>, LORAHUB_QKV_STACKED_BASE=1; default off)
/// dx's base part is one GEMM for every run of gradients that are adjacent column slices of one buffer; with the stacked
/// forward too (LORAHUB_QKV_STACKED_FORWARD=1) the bases are one GEMM x·[W₁; W₂; …]ᵀ whose column slices are the outputs,
/// and the row scales (on CUDA) one pass over that whole output each way.
/// </summary>
internal sealed class LoraQkvFunction(IReadOnlyList<LowRankParts> projections, RowScales? rowScales = null) : CustomFunction
{
    private Tensor? x, aStacked, xa;
    private readonly Tensor?[] bs = new Tensor?[projections.Count];
    private readonly long[] offsets = new long[projections.Count]; // each update's first row in the stacked A
    private readonly Tensor?[] scales = new Tensor?[projections.Count], scaled = new Tensor?[projections.Count]; // c and c ⊙ inner + b
    private readonly Tensor?[] divisors = new Tensor?[projections.Count]; // n of c = m/n (DividedRowScale): the scale input is m
    private ScalarType[] inputTypes = [];
    // Stacked bases (StackedBases): forward's whole (tokens × Σ out) output, and where the row scales went in one pass
    // over it, their per-column values and (when a scale needs its gradient) that output, for backward's one pass.
    private Tensor? stackedAll, stackedY;
    private StackedBases.Scales? stackedScales;

    protected override string name => "lora_qkv";

    private bool NeedsAnyA() => Enumerable.Range(0, projections.Count).Any(i => needs_input_grad(1 + 2 * i));

    protected override Tensor[] forward(Tensor?[] inputs)
    {
        inputTypes = inputs.Select(t => t?.dtype ?? ScalarType.Float32).ToArray();
        var xin = inputs[0]!;
        var dt = xin.dtype;
        // The bases as one GEMM into column slices of one buffer where their weights are stacked (StackedBases), else one each.
        var outputs = StackedForward(xin, inputs) ?? projections.Select(p => p.InnerForward(xin)).ToArray();
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
        // Stacked bases: all row scales in one pass over the whole output where it applies.
        var scaledTogether = ScaleStacked(inputs);
        for (var i = 0; i < projections.Count; i++)
        {
            if (inputs.ElementAtOrDefault(ScaleInput(i)) is not { } input) continue;
            // c's values (the input itself, or for c = m/n the values beside the input m).
            var c = rowScales?.Values[i] ?? input;
            if (!scaledTogether) projections[i].ScaleRows_(outputs[i], c);
            scales[i] = save(c);
            if (rowScales?.Divisors[i] is { } n) divisors[i] = save(n);
            // The output itself (the caller does not change it in place), read in backward and never written.
            if (needs_input_grad(ScaleInput(i))) scaled[i] = save(outputs[i]);
        }
        return outputs;
    }

    private int ScaleInput(int projection) => 1 + 2 * projections.Count + projection;

    // The stacked bases' outputs (StackedBases: weights re-homed into one storage on the first call that finds them apart),
    // or null. With row scales only where their CUDA kernel runs (one pass over the whole output, ScaleStacked): elsewhere
    // scaling column slices would take slower tensor ops.
    private Tensor[]? StackedForward(Tensor x, Tensor?[] inputs)
    {
        if (!StackedBases.Applies(projections, x) || projections.Count < 2) return null;
        // Re-homed here in any case: backward's dx GEMM needs the weights stacked.
        if (StackedBases.Weight(projections, rehome: true, out var why) is not { } w)
        {
            StackedBases.Miss(why!);
            return null;
        }
        if (!StackedBases.Applies(projections, x, forward: true)) return null;
        if ((x.device_type != DeviceType.CUDA || !LoraRowScaleKernels.Enabled)
            && Enumerable.Range(0, projections.Count).Any(i => inputs.ElementAtOrDefault(ScaleInput(i)) is not null))
        {
            StackedBases.Miss("row scales without their CUDA kernel");
            return null;
        }
        return StackedBases.Forward(projections, x, w, out stackedAll);
    }

    // With the bases stacked: every row scale in one pass over the whole output (StackedBases.ScaleRows_), kept for
    // backward's one pass; false where that does not apply (each projection then scales its own slice).
    private bool ScaleStacked(Tensor?[] inputs)
    {
        if (stackedAll is null) return false;
        var n = projections.Count;
        var cs = Enumerable.Range(0, n).Select(i => inputs.ElementAtOrDefault(ScaleInput(i)) is { } input ? rowScales?.Values[i] ?? input : null).ToArray();
        if (cs.All(c => c is null)) return false;
        var divs = Enumerable.Range(0, n).Select(i => cs[i] is null ? null : rowScales?.Divisors[i]).ToArray();
        if (StackedBases.ScaleRows_(projections, stackedAll, cs, divs) is not { } s) return false;
        stackedScales = new(save(s.C), s.Bias is null ? null : save(s.Bias), s.Divisor is null ? null : save(s.Divisor));
        if (Enumerable.Range(0, n).Any(i => cs[i] is not null && needs_input_grad(ScaleInput(i)))) stackedY = save(stackedAll);
        return true;
    }

    // Backward of ScaleStacked's one pass (the gradients read as one buffer: StackedBases.RowScaleBackward): d(inner) as
    // slices of one new buffer (so dx stays one GEMM) and each scale's gradient; false where it does not apply.
    private bool ScaleBackwardStacked(Tensor[] dys, Tensor?[] grads, Func<Tensor, int, Tensor> grad)
    {
        if (stackedScales is not { } s || StackedBases.RowScaleBackward(projections, dys, stackedY, s) is not { } result) return false;
        var (dInner, dc) = result;
        long offset = 0;
        for (var i = 0; i < projections.Count; i++)
        {
            var width = projections[i].OutFeatures;
            dys[i] = dInner.narrow(1, offset, width);
            if (dc is not null && scales[i] is not null && needs_input_grad(ScaleInput(i)))
                grads[ScaleInput(i)] = grad(dc.narrow(0, offset, width), ScaleInput(i));
            offset += width;
        }
        return true;
    }

    protected override Tensor?[] backward(Tensor[] grad_outputs)
    {
        var grads = new Tensor?[1 + 3 * projections.Count];
        var dt = aStacked?.dtype ?? projections[0].WeightDtype;
        var dys = grad_outputs.Take(projections.Count).Select(d => d.dtype == dt ? d : d.to(dt)).ToArray();
        Tensor Grad(Tensor t, int input) => t.dtype == inputTypes[input] ? t : t.to(inputTypes[input]);

        // Row scales: y = c ⊙ inner + b, so dc = Σ_tokens dy ⊙ inner and d(inner) = dy ⊙ c (a new tensor: dy is not ours to change).
        // Stacked bases with adjacent gradients: every row scale's backward in one pass.
        var together = ScaleBackwardStacked(dys, grads, Grad);
        for (var i = 0; i < projections.Count && !together; i++)
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
            // dx accumulated into one buffer by addmm: the bases (one GEMM for gradients that are adjacent column slices of
            // one buffer, with the weights stacked: StackedBases), then all updates at once.
            var dx = StackedBases.InputGrad(projections, dys, projections.Count > 1 ? StackedBases.Weight(projections, rehome: false, out _) : null);
            if (dxa is not null) torchx.addmm_(dx, dxa, aStacked!);
            grads[0] = dx;
        }
        return grads;
    }
}
