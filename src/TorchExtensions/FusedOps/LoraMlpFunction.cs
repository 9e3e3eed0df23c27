using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// The gated MLP down(act(gate(x))·up(x)) with each projection's low-rank update, as one autograd function with a
/// hand-derived backward (inputs: x (tokens × hidden), A_gate, B_gate, A_up, B_up, A_down, B_down; null where a projection
/// has no update). The frozen bases get no gradient. Saved for backward: g and u (the gate and up outputs, updates
/// included), x only when the gate or up update needs it, and the thin x·Aᵀ products; act(g)·u is recomputed from g and u
/// instead of being kept (the composite path keeps it as down's input).
/// </summary>
internal sealed class LoraMlpFunction(LowRankParts gate, LowRankParts up, LowRankParts down, string activation) : CustomFunction
{
    private Tensor? x, g, u;
    private Tensor? aGateUp, xaGateUp, bGate, bUp; // [A_gate; A_up] and x·[A_gate; A_up]ᵀ in the activations' dtype
    private Tensor? aDown, bDown, xaDown;
    private ScalarType[] inputTypes = [];

    protected override string name => "lora_mlp";

    private long RankGate => gate.Rank;
    private long RankUp => up.Rank;

    protected override Tensor[] forward(Tensor?[] inputs)
    {
        inputTypes = inputs.Select(t => t?.dtype ?? ScalarType.Float32).ToArray();
        var xin = inputs[0]!;
        var dt = xin.dtype;
        Tensor? Cast(Tensor? t) => t is null ? null : t.dtype == dt ? t : t.to(dt);
        Tensor? ag = Cast(inputs[1]), bg = Cast(inputs[2]), au = Cast(inputs[3]), bu = Cast(inputs[4]);
        Tensor? ad = Cast(inputs[5]), bd = Cast(inputs[6]);

        var gOut = gate.BaseForward(xin);
        var uOut = up.BaseForward(xin);
        // One read of x for both updates: a single thin GEMM over [A_gate; A_up].
        var agu = (ag, au) switch
        {
            ({ } a1, { } a2) => cat([a1, a2], 0),
            ({ } a1, null) => a1,
            (null, { } a2) => a2,
            _ => null,
        };
        if (agu is not null)
        {
            var xa = xin.mm(agu.t());
            if (ag is not null) torchx.addmm_(gOut, xa.narrow(1, 0, RankGate), bg!.t(), 1, gate.Scaling);
            if (au is not null) torchx.addmm_(uOut, xa.narrow(1, RankGate, RankUp), bu!.t(), 1, up.Scaling);
            if (needs_input_grad(1) || needs_input_grad(3)) x = save(xin);
            aGateUp = save(agu);
            xaGateUp = save(xa);
            if (bg is not null) bGate = save(bg);
            if (bu is not null) bUp = save(bu);
        }
        var h = LoraGatedActivation.Forward(activation, gOut, uOut);
        var y = down.BaseForward(h);
        if (ad is not null)
        {
            var xad = h.mm(ad.t());
            torchx.addmm_(y, xad, bd!.t(), 1, down.Scaling);
            aDown = save(ad);
            bDown = save(bd);
            xaDown = save(xad);
        }
        h.Dispose();
        g = save(gOut);
        u = save(uOut);
        return [y];
    }

    protected override Tensor?[] backward(Tensor[] grad_outputs)
    {
        var grads = new Tensor?[7];
        var dy = grad_outputs[0].dtype == g!.dtype ? grad_outputs[0] : grad_outputs[0].to(g.dtype);
        Tensor Grad(Tensor t, int input) => t.dtype == inputTypes[input] ? t : t.to(inputTypes[input]);
        Tensor Own(Tensor view, int input) => view.dtype == inputTypes[input] ? view.clone() : view.to(inputTypes[input]);

        // down: y = h·W_dᵀ + s_d·(h·A_dᵀ)·B_dᵀ
        Tensor? dxaDown = null;
        if (aDown is not null)
        {
            dxaDown = dy.mm(bDown!).mul_(down.Scaling);
            if (needs_input_grad(6)) grads[6] = Grad(dy.t().mm(xaDown!).mul_(down.Scaling), 6);
            if (needs_input_grad(5))
            {
                using var h = LoraGatedActivation.Forward(activation, g, u!);
                grads[5] = Grad(dxaDown.t().mm(h), 5);
            }
        }
        var dh = down.WithWeight(w => dy.mm(w));
        if (dxaDown is not null) torchx.addmm_(dh, dxaDown, aDown!);
        var (dg, du) = LoraGatedActivation.Backward(activation, dh, g, u!);
        dh.Dispose();

        // gate and up: g = x·W_gᵀ + s_g·(x·A_gᵀ)·B_gᵀ, u likewise, with x·[A_g; A_u]ᵀ computed once.
        Tensor? dxa = null;
        if (aGateUp is not null)
        {
            var parts = new List<Tensor>();
            if (bGate is not null)
            {
                var xa = xaGateUp!.narrow(1, 0, RankGate);
                parts.Add(dg.mm(bGate).mul_(gate.Scaling));
                if (needs_input_grad(2)) grads[2] = Grad(dg.t().mm(xa).mul_(gate.Scaling), 2);
            }
            if (bUp is not null)
            {
                var xa = xaGateUp!.narrow(1, RankGate, RankUp);
                parts.Add(du.mm(bUp).mul_(up.Scaling));
                if (needs_input_grad(4)) grads[4] = Grad(du.t().mm(xa).mul_(up.Scaling), 4);
            }
            dxa = parts.Count == 1 ? parts[0] : cat(parts, 1);
            if (x is not null)
            {
                // Both A gradients in one GEMM, then split (copied: each gradient owns its memory).
                var da = dxa.t().mm(x);
                if (needs_input_grad(1)) grads[1] = Own(da.narrow(0, 0, RankGate), 1);
                if (needs_input_grad(3)) grads[3] = Own(da.narrow(0, RankGate, RankUp), 3);
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
        return grads;
    }
}
