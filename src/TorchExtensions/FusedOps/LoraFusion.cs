using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// Fused LoRA blocks for models to call (Llama's MLP and attention projections): the whole block as one autograd
/// function with a hand-derived backward, taken only where it computes exactly what the block's modules would — every
/// projection a frozen Linear (dense or 4-bit, dequantized inside per GEMM) or an <see cref="ILowRankLinear"/> offering
/// its parts (one active unmerged adapter, no dropout in training, no row routing, no lora bias, no variant unless the
/// variant supplies exact parts: DoRA with its norm detached adds a per-output-row scale, <see cref="LowRankParts.RowScale"/>),
/// one dtype and device, at least one update in the block, and the switch on (<see cref="torchx.nn.functional.Fused.LoraMlp"/>, <see cref="torchx.nn.functional.Fused.LoraQkv"/>).
/// Otherwise the caller runs its modules (the composite path). Each call records the path the block took
/// (<see cref="LoraFusionPaths"/>).
/// </summary>
public static class LoraFusion
{
    private static long mlpCount, qkvCount, projectionCount;

    /// <summary>Fused MLP blocks run so far in this process (for tests and diagnostics).</summary>
    public static long MlpCount => Interlocked.Read(ref mlpCount);

    /// <summary>Fused q/k/v blocks run so far in this process.</summary>
    public static long QkvCount => Interlocked.Read(ref qkvCount);

    /// <summary>Single projections fused so far (<see cref="TryProjection"/>).</summary>
    public static long ProjectionCount => Interlocked.Read(ref projectionCount);

    /// <summary>
    /// down(act(gate(x))·up(x)) fused, or null when the block must take the composite path (the reason is recorded for
    /// <paramref name="block"/>). <paramref name="activation"/>: silu, gelu_pytorch_tanh, gelu_new or gelu.
    /// <paramref name="fused"/> overrides the switch.
    /// </summary>
    public static Tensor? TryMlp(nn.Module block, string activation, nn.Module gate, nn.Module up, nn.Module down, Tensor x, bool? fused = null) =>
        Mlp(block, activation, gate, up, down, x, null, fused);

    /// <summary>
    /// Whether <see cref="TryMlpResidual"/> hands the residual to the fused block (default on; LORAHUB_DOWN_RESIDUAL_EPILOGUE=0:
    /// off), where on CUDA one kernel adds down_proj's update, its DoRA row scale and the residual after the base GEMM
    /// (<see cref="LoraDownResidualKernels"/>); the decoder layers then add mlp(x) to the stream themselves.
    /// </summary>
    public static bool MlpResidual
    {
        get => LoraDownResidualKernels.Enabled;
        set => LoraDownResidualKernels.Enabled = value;
    }

    /// <summary>
    /// Whether the fused MLP blocks added down_proj's update, row scale and the residual in one kernel: its launches so far,
    /// or why it is off.
    /// </summary>
    public static string MlpResidualKernel => LoraDownResidualKernels.Report;

    /// <summary>Forward passes of the fused MLP blocks that added the residual in that kernel so far (tests, diagnostics).</summary>
    public static long MlpResidualLaunches => LoraDownResidualKernels.Launches;

    /// <summary>Fused MLP blocks run so far with the residual as their input (<see cref="TryMlpResidual"/>; kernel or not).</summary>
    public static long MlpResidualCount => Interlocked.Read(ref mlpResidualCount);

    private static long mlpResidualCount;

    /// <summary>
    /// residual + down(act(gate(x))·up(x)) with the MLP fused (<see cref="TryMlp"/>), or null when the MLP must take the
    /// composite path (the reason recorded for <paramref name="block"/>). The residual (x's shape but for the last
    /// dimension, down_proj's width) goes into the fused block where <see cref="MlpResidual"/> is on and it has x's dtype
    /// and device, and the kernel adds it there where it applies; otherwise it is added after the block as a tensor op.
    /// Its gradient is the output's.
    /// </summary>
    public static Tensor? TryMlpResidual(nn.Module block, string activation, nn.Module gate, nn.Module up, nn.Module down, Tensor x,
        Tensor residual, bool? fused = null)
    {
        var inside = MlpResidual && residual.dtype == x.dtype && KernelTensors.SameDevice(residual, x) && residual.dim() == x.dim()
            && residual.shape[..^1].SequenceEqual(x.shape[..^1]);
        if (inside) return Mlp(block, activation, gate, up, down, x, residual, fused);
        using var scope = NewDisposeScope();
        return Mlp(block, activation, gate, up, down, x, null, fused) is { } y ? residual.add(y).MoveToOuterDisposeScope() : null;
    }

    // TryMlp, with the residual (or null) added inside the fused block; null where the block takes the composite path.
    private static Tensor? Mlp(nn.Module block, string activation, nn.Module gate, nn.Module up, nn.Module down, Tensor x, Tensor? residual,
        bool? fused)
    {
        LowRankParts? g = null, u = null, d = null;
        var hidden = x.size(-1);
        var why = !(fused ?? torchx.nn.functional.Fused.LoraMlp) ? "lora_mlp off"
            : fused is null && OnCpu(x) ? "cpu (Fused.LoraBlocksOnCpu off)"
            : !LoraGatedActivation.Supports(activation) ? $"activation {activation}"
            : Check("gate_proj", gate, x, hidden, out g) ?? Check("up_proj", up, x, hidden, out u);
        if (why is null && g!.OutFeatures != u!.OutFeatures) why = "gate_proj and up_proj differ in width";
        why ??= Check("down_proj", down, x, g!.OutFeatures, out d);
        if (why is null && !(g!.HasUpdate || u!.HasUpdate || d!.HasUpdate)) why = "no adapter";
        using var scope = NewDisposeScope();
        var scales = new RowScales(3);
        if (why is null) why = Scales(["gate_proj", "up_proj", "down_proj"], [g!, u!, d!], x, scales);
        if (why is null && residual is not null && residual.size(-1) != d!.OutFeatures)
            why = $"residual of width {residual.size(-1)} for {d.OutFeatures} outputs";
        LoraFusionPaths.Record(block, "mlp", why);
        if (why is not null) return null;
        var x2 = x.reshape(-1, hidden);
        var y = new LoraMlpFunction(g!, u!, d!, activation, scales)
            .apply(x2, g!.A, g.B, u!.A, u.B, d!.A, d.B, scales.Inputs[0], scales.Inputs[1], scales.Inputs[2],
                residual?.reshape(-1, residual.size(-1)))[0];
        Interlocked.Increment(ref mlpCount);
        if (residual is not null) Interlocked.Increment(ref mlpResidualCount);
        return y.view([.. x.shape[..^1], y.size(-1)]).MoveToOuterDisposeScope();
    }

    // The blocks pay off where kernels launch asynchronously; on the CPU the composite ops are faster (Fused.LoraBlocksOnCpu).
    private static bool OnCpu(Tensor x) => x.device_type != DeviceType.CUDA && !torchx.nn.functional.Fused.LoraBlocksOnCpu;

    /// <summary>
    /// q, k, v = q_proj(x), k_proj(x), v_proj(x) fused (one read of x for all updates), or null when the block must take
    /// the composite path (the reason is recorded for <paramref name="block"/>).
    /// </summary>
    public static (Tensor q, Tensor k, Tensor v)? TryQkv(nn.Module block, nn.Module q, nn.Module k, nn.Module v, Tensor x, bool? fused = null) =>
        TryProjections(block, "qkv", ["q_proj", "k_proj", "v_proj"], [q, k, v], x, fused, ref qkvCount) is { } r ? (r[0], r[1], r[2]) : null;

    /// <summary>
    /// module(x) for a single projection (attention's o_proj) through the same fused function as q, k, v with one
    /// projection: the adapter's casts and gradient casts in one launch each, s in the GEMMs' epilogues, dx accumulated by
    /// addmm, where LoRA's layer leaves them to autograd's nodes. Null when it must take the composite path (the reason is
    /// recorded for <paramref name="module"/>, as its <paramref name="role"/>), e.g. "no adapter" for an untargeted one.
    /// </summary>
    public static Tensor? TryProjection(nn.Module module, string role, Tensor x, bool? fused = null) =>
        TryProjections(module, role, [role], [module], x, fused, ref projectionCount)?[0];

    // The projections of one input x through LoraQkvFunction, or null (the reason recorded for block as kind) when they
    // must take the composite path; counter counts the fused calls.
    private static Tensor[]? TryProjections(nn.Module block, string kind, string[] roles, nn.Module[] modules, Tensor x, bool? fused,
        ref long counter)
    {
        var hidden = x.size(-1);
        var parts = new LowRankParts?[modules.Length];
        var why = !(fused ?? torchx.nn.functional.Fused.LoraQkv) ? "lora_qkv off"
            : fused is null && OnCpu(x) ? "cpu (Fused.LoraBlocksOnCpu off)"
            : null;
        for (var i = 0; i < modules.Length && why is null; i++) why = Check(roles[i], modules[i], x, hidden, out parts[i]);
        if (why is null && !parts.Any(p => p!.HasUpdate)) why = "no adapter";
        using var scope = NewDisposeScope();
        var scales = new RowScales(modules.Length);
        if (why is null) why = Scales(roles, parts!, x, scales);
        LoraFusionPaths.Record(block, kind, why);
        if (why is not null) return null;
        var inputs = new List<Tensor?> { x.reshape(-1, hidden) };
        foreach (var p in parts) inputs.AddRange([p!.A, p.B]);
        inputs.AddRange(scales.Inputs);
        var outs = new LoraQkvFunction(parts!, scales).apply([.. inputs]);
        Interlocked.Increment(ref counter);
        var lead = x.shape[..^1];
        return outs.Select(o => o.view([.. lead, o.size(-1)]).MoveToOuterDisposeScope()).ToArray();
    }

    // The row scales c of the projections that have one (made now, in the caller's dispose scope: only once every other
    // check passed), or why one cannot be used.
    private static string? Scales(string[] roles, LowRankParts[] parts, Tensor x, RowScales scales)
    {
        for (var i = 0; i < parts.Length; i++)
        {
            Tensor c;
            if (parts[i].DividedRowScale is { } divided)
            {
                (c, var m, var n) = divided();
                (scales.Inputs[i], scales.Values[i], scales.Divisors[i]) = (m, c, n);
                foreach (var (t, what) in new[] { (m, "magnitude"), (n, "divisor") })
                    if (t.dim() != 1 || t.size(0) != parts[i].OutFeatures || !t.is_floating_point() || !KernelTensors.SameDevice(t, x))
                        return $"{roles[i]}: row scale {what} is not a floating-point vector of {parts[i].OutFeatures} on the input's device";
            }
            else if (parts[i].RowScale is { } make) c = scales.Inputs[i] = scales.Values[i] = make();
            else continue;
            if (c.dim() != 1 || c.size(0) != parts[i].OutFeatures)
                return $"{roles[i]}: row scale of shape [{string.Join(", ", c.shape)}] for {parts[i].OutFeatures} outputs";
            if (!c.is_floating_point()) return $"{roles[i]}: row scale is not floating point";
            if (!KernelTensors.SameDevice(c, x)) return $"{roles[i]}: row scale on another device than the input";
        }
        return null;
    }

    // Null when the projection can be fused for input x (last dimension `inFeatures`), else why not.
    private static string? Check(string role, nn.Module module, Tensor x, long inFeatures, out LowRankParts? parts)
    {
        parts = LowRankParts.From(module, out var reason);
        if (parts is null) return $"{role}: {reason}";
        if (parts.InFeatures != inFeatures) return $"{role}: takes {parts.InFeatures} features, not {inFeatures}";
        if (parts.WeightDtype != x.dtype) return $"{role}: weight {parts.WeightDtype}, input {x.dtype}";
        if (parts.WeightDevice is not { } wd || !torchx.is_on(x, wd))
            return $"{role}: weight on {parts.WeightDevice}, input on {x.device}";
        if (parts.Bias is { } b && (b.dtype != x.dtype || !KernelTensors.SameDevice(b, x))) return $"{role}: bias dtype or device differs from the input's";
        if (parts.A is { } a && parts.B is { } bb)
        {
            if (!KernelTensors.SameDevice(a, x) || !KernelTensors.SameDevice(bb, x)) return $"{role}: adapter on another device than the input";
            if (!a.is_floating_point() || !bb.is_floating_point()) return $"{role}: adapter is not floating point";
            if (a.dim() != 2 || bb.dim() != 2 || a.size(1) != inFeatures || bb.size(0) != parts.OutFeatures || bb.size(1) != a.size(0))
                return $"{role}: adapter shapes do not match the weight";
        }
        else if (parts.A is not null || parts.B is not null) return $"{role}: adapter without both A and B";
        return null;
    }
}
