using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// The gated MLP down(act(gate(x))·up(x)) with each projection's low-rank update, as one autograd function with a
/// hand-derived backward (inputs: x (tokens × hidden), A_gate, B_gate, A_up, B_up, A_down, B_down, then the row scales
/// c_gate, c_up, c_down; null where a projection has no update or no scale; then an optional residual r of the output's
/// shape: the output is then r + mlp(x), and r's gradient the output's). The frozen bases get no gradient. Saved for
/// backward: g and u (the gate and up outputs, updates included), x only when the gate or up update needs it, and the
/// thin x·Aᵀ products; act(g)·u is recomputed from g and u instead of being kept (the composite path keeps it as down's
/// input). The bases are two GEMMs over x (their weights are separate parameters), both updates one thin GEMM over
/// [A_gate; A_up]; updates are added by addmm, and backward accumulates dx into one buffer by addmm. The A's and B's are
/// cast to the activations' dtype by one _foreach_copy_ launch, their gradients back by another.
/// A projection with a row scale c (DoRA, <see cref="LowRankParts.RowScale"/>) outputs c ⊙ inner + b, inner being the
/// unscaled x·Wᵀ + s·(x·Aᵀ)·Bᵀ, scaled in place (one pass; g and u are saved scaled, as act(g)·u needs them). c's
/// gradient Σ_tokens dy ⊙ inner recovers inner from the output as (y − b)/c (<see cref="LowRankParts.RowScaleGrad"/>:
/// exact up to the output's rounding, as DoRA's output kernel does), so nothing more is kept than for LoRA except down's
/// output when c_down needs a gradient; the rest of backward runs on dy ⊙ c. On CUDA with silu the gate and up scales are
/// applied inside the SwiGLU kernels instead (<see cref="LoraRowScaleKernels"/>): g, u stay unscaled, no extra pass over them,
/// and their scales' gradients are exact sums over the unscaled values; that backward pass also writes h for A_down's
/// gradient (no separate recompute).
/// On CUDA (bf16/fp16, silu, ranks multiples of 16 up to 64) the low-rank updates go into the SwiGLU kernels instead
/// (<see cref="LoraMlpKernels"/>, tensor cores): forward adds s·xa·Bᵀ to g and u on load (g, u are saved without their
/// updates), backward adds dxa_down·A_down to dh, recomputes the updated g, u on load, writes h for A_down's gradient in
/// the same pass and dg, du over dh and u: no addmm pass over a tokens × intermediate tensor and no separate recompute of
/// h. Gate/up row scales (DoRA, without a bias there) go in too where <see cref="LoraMlpKernels.RowScalesEnabled"/>: applied
/// after the update on load, their gradients summed over tokens in the backward pass.
/// On CUDA (bf16/fp16, ranks up to <see cref="LowRankKernels.FasterUpToRank"/>) each projection's two thin products of
/// backward, dxa = s·dy·B and B's gradient s·dyᵀ·xa, come from one read of its output gradient (<see cref="LowRankKernels"/>;
/// gate's and up's dxa straight into one stacked buffer) instead of two GEMMs.
/// With a residual r, on CUDA (bf16/fp16) down's update, its row scale and r are added after the base GEMM by one kernel
/// (<see cref="LoraDownResidualKernels"/>: r + c_down ⊙ (h·W_dᵀ + s_d·xa_d·B_dᵀ)) instead of the addmm, the row-scale pass
/// and the residual add; where c_down needs its gradient the kernel also leaves c_down ⊙ inner for it. Elsewhere r is
/// added to the output as a tensor op (the bits of the decoder's own add).
/// </summary>
internal sealed class LoraMlpFunction(LowRankParts gate, LowRankParts up, LowRankParts down, string activation, RowScales? rowScales = null)
    : CustomFunction
{
    private Tensor? x, g, u;
    private Tensor? aGateUp, xaGateUp, bGate, bUp; // [A_gate; A_up] and x·[A_gate; A_up]ᵀ in the activations' dtype
    private Tensor? aDown, bDown, xaDown;
    private Tensor? cGate, cUp, cDown, yDown; // row scales (their own dtype) and down's output (for c_down's gradient)
    private Tensor? nGate, nUp, nDown; // n of c = m/n (DividedRowScale: the scale inputs are the m's, their gradients dc/n)
    private ScalarType[] inputTypes = [];
    private bool scaledInKernel; // g, u kept unscaled, their row scales applied by LoraRowScaleKernels
    private bool lowRankInKernel; // g, u kept without their updates, added by LoraMlpKernels

    protected override string name => "lora_mlp";

    private long RankGate => gate.Rank;
    private long RankUp => up.Rank;

    // The gate's and up's columns of x·[A_gate; A_up]ᵀ (null without that update).
    private Tensor? XaGate => bGate is null ? null : xaGateUp!.narrow(1, 0, RankGate);
    private Tensor? XaUp => bUp is null ? null : xaGateUp!.narrow(1, RankGate, RankUp);

    protected override Tensor[] forward(Tensor?[] inputs)
    {
        inputTypes = inputs.Select(t => t?.dtype ?? ScalarType.Float32).ToArray();
        var xin = inputs[0]!;
        var dt = xin.dtype;
        var (agu, bg, bu, ad, bd) = InComputeType(inputs, dt);
        Tensor? ag = inputs[1], au = inputs[3]; // null or not: which of gate and up have an update
        // c's values: the inputs themselves, or for c = m/n the values beside the inputs m.
        Tensor? Scale(int i) => inputs.ElementAtOrDefault(7 + i) is null ? null : rowScales?.Values[i] ?? inputs[7 + i];
        Tensor? Divisor(int i) => inputs.ElementAtOrDefault(7 + i) is null || rowScales?.Divisors[i] is not { } n ? null : save(n);
        Tensor? cg = Scale(0), cu = Scale(1), cd = Scale(2);
        (nGate, nUp, nDown) = (Divisor(0), Divisor(1), Divisor(2));

        var gOut = gate.InnerForward(xin);
        var uOut = up.InnerForward(xin);
        // Row scales on gate/up (DoRA) go into a kernel only without a bias there (it is added after the scale).
        var gateUpScaled = cg is not null || cu is not null;
        var scalesFit = (cg is null || gate.Bias is null) && (cu is null || up.Bias is null);
        // The updates inside the SwiGLU kernels: LoRA, and DoRA where its gate/up row scales go in too.
        lowRankInKernel = (!gateUpScaled || scalesFit && LoraMlpKernels.RowScalesEnabled && LoraMlpKernels.RowScalesApply(gOut, cg, cu))
            && LoraMlpKernels.Applies(activation, gOut, uOut, ag is null ? 0 : RankGate, au is null ? 0 : RankUp, ad is null ? 0 : down.Rank);
        // One read of x for both updates: a single thin GEMM over [A_gate; A_up].
        if (agu is not null)
        {
            var xa = xin.mm(agu.t());
            if (!lowRankInKernel && ag is not null) torchx.addmm_(gOut, xa.narrow(1, 0, RankGate), bg!.t(), 1, gate.Scaling);
            if (!lowRankInKernel && au is not null) torchx.addmm_(uOut, xa.narrow(1, RankGate, RankUp), bu!.t(), 1, up.Scaling);
            if (needs_input_grad(1) || needs_input_grad(3)) x = save(xin);
            aGateUp = save(agu);
            xaGateUp = save(xa);
            if (bg is not null) bGate = save(bg);
            if (bu is not null) bUp = save(bu);
        }
        if (cg is not null) cGate = save(cg);
        if (cu is not null) cUp = save(cu);
        // Row scales on gate/up: applied on load by the scaled SwiGLU kernels where they run (g, u then stay unscaled, and
        // backward takes the kernels too), else in place (one pass each; g, u saved scaled). A bias is added after a scale,
        // which the kernels do not do.
        scaledInKernel = !lowRankInKernel && gateUpScaled && scalesFit && LoraRowScaleKernels.Applies(activation, gOut, uOut);
        if (!scaledInKernel && !lowRankInKernel)
        {
            if (cg is not null) gate.ScaleRows_(gOut, cg);
            if (cu is not null) up.ScaleRows_(uOut, cu);
        }
        // down's thin product h·A_dᵀ formed by the kernel itself where its variant does (else one GEMM below).
        var xadBox = new System.Runtime.CompilerServices.StrongBox<Tensor?>();
        var h = lowRankInKernel ? LoraMlpKernels.Forward(gOut, uOut, XaGate, bGate, gate.Scaling, XaUp, bUp, up.Scaling, cg, cu, downA: ad, downXa: xadBox)
            : scaledInKernel ? LoraRowScaleKernels.SwiGluForward(gOut, uOut, cg, cu) : LoraGatedActivation.Forward(activation, gOut, uOut);
        var y = down.InnerForward(h);
        Tensor? xad = null;
        if (ad is not null)
        {
            xad = xadBox.Value ?? h.mm(ad.t());
            aDown = save(ad);
            bDown = save(bd!);
            xaDown = save(xad);
        }
        h.Dispose();
        if (cd is not null) cDown = save(cd);
        g = save(gOut);
        u = save(uOut);
        var residual = inputs.ElementAtOrDefault(10);
        // c_down's gradient reads c ⊙ inner (without the residual): kept where it is needed.
        var keepScaled = cd is not null && needs_input_grad(9);
        // residual + c ⊙ (y + s·xa·Bᵀ) in one pass over y, with c ⊙ inner written back over y where c needs its gradient.
        if (residual is not null && LoraDownResidualKernels.Applies(y, residual, xad, bd, cd, down.Bias)
            && LoraDownResidualKernels.Forward(y, residual, xad, bd, down.Scaling, cd, keepScaled) is { } output)
        {
            if (keepScaled) yDown = save(y);
            return [output];
        }
        if (xad is not null) torchx.addmm_(y, xad, bd!.t(), 1, down.Scaling);
        if (cd is not null)
        {
            down.ScaleRows_(y, cd);
            // The output itself (the caller does not change it in place), read in backward and never written.
            if (keepScaled) yDown = save(y);
        }
        // The residual added as the decoder adds it (h + mlp(x)): the same bits as without it.
        return [residual is null ? y : residual.add(y)];
    }

    // [A_gate; A_up] (stacked), B_gate, B_up, A_down, B_down in the activations' dtype (null where absent): the masters
    // cast by one launch (the A's straight into the stack) where five casts and a cat each launched a small kernel.
    private static (Tensor? agu, Tensor? bg, Tensor? bu, Tensor? ad, Tensor? bd) InComputeType(Tensor?[] inputs, ScalarType dt)
    {
        var cast = new ForeachCast();
        Tensor[] gateUp = [.. new[] { inputs[1], inputs[3] }.OfType<Tensor>()];
        var agu = gateUp.Length == 0 ? null : cast.Stack(gateUp, dt);
        var (bg, bu, ad, bd) = (cast.To(inputs[2], dt), cast.To(inputs[4], dt), cast.To(inputs[5], dt), cast.To(inputs[6], dt));
        cast.Run();
        return (agu, bg, bu, ad, bd);
    }

    protected override Tensor?[] backward(Tensor[] grad_outputs)
    {
        var grads = new Tensor?[11];
        var dy = grad_outputs[0].dtype == g!.dtype ? grad_outputs[0] : grad_outputs[0].to(g.dtype);
        Tensor Grad(Tensor t, int input) => t.dtype == inputTypes[input] ? t : t.to(inputTypes[input]);
        // The residual's gradient is the output's itself (as autograd's AddBackward gives it; nothing here writes it).
        if (needs_input_grad(10)) grads[10] = Grad(grad_outputs[0], 10);

        // down's row scale: y = c ⊙ inner + b, so dc = Σ dy ⊙ inner and d(inner) = dy ⊙ c (a copy: dy may be shared
        // with the residual branch).
        if (cDown is not null)
        {
            var needC = yDown is not null && needs_input_grad(9);
            if (LoraRowScaleKernels.AppliesTo(dy))
            {
                (dy, var dc) = LoraRowScaleKernels.RowScaleBackward(dy, needC ? yDown : null, cDown, down.Bias, nDown);
                if (dc is not null) grads[9] = Grad(dc, 9);
            }
            else
            {
                if (needC) grads[9] = Grad(down.RowScaleGrad(yDown!, dy, cDown, inPlace: false, nDown), 9);
                dy = dy.clone().mul_(cDown);
            }
        }

        // down: y = h·W_dᵀ + s_d·(h·A_dᵀ)·B_dᵀ
        Tensor? dxaDown = null;
        if (aDown is not null)
        {
            // On CUDA one read of dy for both thin products (LowRankKernels), else two GEMMs.
            if (LowRankKernels.StackedBackward([new(dy, bDown!, needs_input_grad(6) ? xaDown : null, down.Scaling, DbType(6))])
                is var (dxa, dbs))
            {
                dxaDown = dxa;
                grads[6] = dbs[0];
            }
            else
            {
                dxaDown = torchx.mm(dy, bDown!, down.Scaling);
                if (needs_input_grad(6)) grads[6] = torchx.mm(dy.t(), xaDown!, down.Scaling);
            }
            // h for A_down's gradient: recomputed here on the ops path; the kernel paths write it in their backward pass.
            if (needs_input_grad(5) && !lowRankInKernel && !scaledInKernel)
            {
                using var h = LoraGatedActivation.Forward(activation, g, u!);
                grads[5] = dxaDown.t().mm(h);
            }
        }
        var dh = down.WithWeight(w => dy.mm(w));
        Tensor dg, du;
        if (lowRankInKernel)
        {
            var wantH = aDown is not null && needs_input_grad(5);
            if (LoraMlpKernels.BackwardApplies(dh, g))
            {
                // dh + dxa_down·A_down, the updated (and scaled) g, u and (for A_down) h in one pass; dg, du, h are written
                // over dh, u, g; with row scales their gradients too.
                // For c = m/n (DividedRowScale) m's gradient dc/n, as autograd's division backward gives it.
                // A_down's gradient formed by the kernel itself where its variant does (fp32; h is then not written).
                var dAd = new System.Runtime.CompilerServices.StrongBox<Tensor?>();
                (dg, du, var h, var dcg, var dcu) = LoraMlpKernels.Backward(dh, dxaDown, aDown, g, u!, XaGate, bGate, gate.Scaling, XaUp,
                    bUp, up.Scaling, wantH, cGate, cUp, gateScaleGrad: needs_input_grad(7), upScaleGrad: needs_input_grad(8), nGate, nUp,
                    downAGrad: dAd);
                if (dAd.Value is not null) grads[5] = dAd.Value;
                else if (h is not null) grads[5] = dxaDown!.t().mm(h);
                if (dcg is not null) grads[7] = Grad(dcg, 7);
                if (dcu is not null) grads[8] = Grad(dcu, 8);
                g.Dispose(); // h's memory now; u's and dh's hold du and dg
                g = u = null;
                return InputSideBackward(grads, dg, du);
            }
            // Not expected (dh is laid out as g): the updates (and scales) into g and u, then the ops path.
            if (bGate is not null) torchx.addmm_(g, XaGate!, bGate.t(), 1, gate.Scaling);
            if (bUp is not null) torchx.addmm_(u!, XaUp!, bUp.t(), 1, up.Scaling);
            if (cGate is not null) gate.ScaleRows_(g, cGate);
            if (cUp is not null) up.ScaleRows_(u!, cUp);
            if (wantH)
            {
                using var h = LoraGatedActivation.Forward(activation, g, u!);
                grads[5] = dxaDown!.t().mm(h);
            }
        }
        if (dxaDown is not null) torchx.addmm_(dh, dxaDown, aDown!);
        if (scaledInKernel)
        {
            // The gradients of the unscaled g, u and of both scales, and h where A_down needs it, in one pass.
            using var h = aDown is not null && needs_input_grad(5) ? empty_like(g) : null;
            (dg, du, var dcg, var dcu) = LoraRowScaleKernels.SwiGluBackward(dh, g, u!, cGate, cUp, h, nGate, nUp);
            if (h is not null) grads[5] = dxaDown!.t().mm(h);
            if (dcg is not null && needs_input_grad(7)) grads[7] = Grad(dcg, 7);
            if (dcu is not null && needs_input_grad(8)) grads[8] = Grad(dcu, 8);
        }
        else (dg, du) = LoraGatedActivation.Backward(activation, dh, g, u!);
        // Not needed any more: freed now rather than after backward, lowering the peak while the input-side GEMMs run.
        dh.Dispose();
        // Row scales of gate and up (ops path): dc from the scaled outputs (overwritten: not needed after this), then dg, du
        // become the gradients of the unscaled ones (dg, du are ours).
        if (!scaledInKernel && cGate is not null)
        {
            if (needs_input_grad(7)) grads[7] = Grad(gate.RowScaleGrad(g, dg, cGate, inPlace: true, nGate), 7);
            dg.mul_(cGate);
        }
        if (!scaledInKernel && cUp is not null)
        {
            if (needs_input_grad(8)) grads[8] = Grad(up.RowScaleGrad(u!, du, cUp, inPlace: true, nUp), 8);
            du.mul_(cUp);
        }
        g.Dispose();
        u!.Dispose();
        return InputSideBackward(grads, dg, du);
    }

    // A B gradient straight in fp32 where its master is fp32 (the kernels accumulate in fp32; no rounding to bf16 first).
    private ScalarType? DbType(int input) => inputTypes[input] == ScalarType.Float32 ? ScalarType.Float32 : null;

    // From dg, du (the gradients of the gate and up outputs): the gradients of x and of the gate and up adapters.
    private Tensor?[] InputSideBackward(Tensor?[] grads, Tensor dg, Tensor du)
    {
        // gate and up: g = x·W_gᵀ + s_g·(x·A_gᵀ)·B_gᵀ, u likewise, with x·[A_g; A_u]ᵀ computed once.
        Tensor? dxa = null;
        if (aGateUp is not null)
        {
            // On CUDA one read of dg (du) for both of its thin products, the dxa's straight into one stacked buffer
            // (LowRankKernels); else two GEMMs each and a cat.
            var kernelParts = new List<LowRankKernels.Part>();
            if (bGate is not null) kernelParts.Add(new(dg, bGate, needs_input_grad(2) ? XaGate : null, gate.Scaling, DbType(2)));
            if (bUp is not null) kernelParts.Add(new(du, bUp, needs_input_grad(4) ? XaUp : null, up.Scaling, DbType(4)));
            if (LowRankKernels.StackedBackward(kernelParts) is var (stacked, dbs))
            {
                dxa = stacked;
                if (bGate is not null) grads[2] = dbs[0];
                if (bUp is not null) grads[4] = dbs[^1];
            }
            else
            {
                var parts = new List<Tensor>();
                if (bGate is not null)
                {
                    parts.Add(torchx.mm(dg, bGate, gate.Scaling));
                    if (needs_input_grad(2)) grads[2] = torchx.mm(dg.t(), XaGate!, gate.Scaling);
                }
                if (bUp is not null)
                {
                    parts.Add(torchx.mm(du, bUp, up.Scaling));
                    if (needs_input_grad(4)) grads[4] = torchx.mm(du.t(), XaUp!, up.Scaling);
                }
                dxa = parts.Count == 1 ? parts[0] : cat(parts, 1);
            }
            if (x is not null)
            {
                // Both A gradients in one GEMM, then split (copied below: each gradient owns its memory).
                var da = dxa.t().mm(x);
                if (needs_input_grad(1)) grads[1] = da.narrow(0, 0, RankGate);
                if (needs_input_grad(3)) grads[3] = da.narrow(0, RankGate, RankUp);
            }
        }
        if (needs_input_grad(0))
        {
            // dx accumulated into one buffer by addmm: gate's base, up's base, both updates.
            var dx = gate.WithWeight(w => dg.mm(w));
            up.WithWeight(w => torchx.addmm_(dx, du, w));
            if (dxa is not null) torchx.addmm_(dx, dxa, aGateUp!);
            grads[0] = dx;
        }
        // The A and B gradients (inputs 1-6, in the activations' dtype so far) in their masters' dtype by one launch; the
        // views of the stacked A gradient are copied even without a cast (each gradient owns its memory).
        var cast = new ForeachCast();
        for (var i = 1; i <= 6; i++) grads[i] = cast.To(grads[i], inputTypes[i], copy: i is 1 or 3);
        cast.Run();
        return grads;
    }
}
