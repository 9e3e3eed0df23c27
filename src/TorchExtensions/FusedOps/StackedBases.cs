using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// The frozen dense bases of projections that read one input (attention's q, k, v) kept back to back in ONE storage, so
/// that <see cref="LoraQkvFunction"/> computes the input gradient as one GEMM [dq | dk | dv]·[W_q; W_k; W_v] where the
/// incoming gradients are adjacent column slices of one buffer (as the rope kernels' backward allocates them), and, with
/// <see cref="StackForward"/>, the outputs as one GEMM x·[W_q; W_k; W_v]ᵀ into one (tokens, Σ out) buffer whose column
/// slices are the outputs. Measured on an H200 (llama-1b, 8192 tokens, GEMMs alone): dx 189 µs as mm and two addmm
/// against 154 µs as one mm; forward 93 + 26 + 26 µs as three GEMMs against 136 µs stacked.
/// </summary>
/// <remarks>
/// The weights are re-homed once, on the first fused call that finds them apart: one (Σ out × in) tensor is allocated,
/// each weight copied into its row block, and each weight Parameter pointed at its block in place (set_: the same
/// Parameter objects, now row slices of one storage, which are contiguous), so the original storages are freed and
/// memory does not grow. Every call checks again by pointer arithmetic (each weight contiguous and starting where the
/// previous one ends, one storage spanning them): a move (.to), a load that replaced the Parameters or anything else that
/// separated them makes the next fused call re-home them again; weights that are not frozen dense Parameters of one dtype,
/// device and input width (4-bit bases, trainable bases) are never stacked and keep one GEMM each. Saving is unaffected:
/// each weight is still its own contiguous (out × in) tensor; writes through it (merge, unmerge, load by copy_) land in
/// the stack. On by default for blocks whose input is on CUDA (<see cref="OnCuda"/>; backward's dx only, the forward
/// stacked too where <see cref="StackForward"/>) and, forward and backward, for blocks whose outputs carry row scales
/// (DoRA: <see cref="RowScaled"/>); LORAHUB_QKV_STACKED_BASE=1 (or <see cref="Enabled"/>) turns it on for every block on
/// any device, =0 off for all. Off: the three GEMMs each way and no re-homing.
/// </remarks>
public static class StackedBases
{
    /// <summary>
    /// Whether every fused q/k/v block stacks its bases, on any device (LORAHUB_QKV_STACKED_BASE=1; default off: see
    /// <see cref="OnCuda"/>). Also makes the rope kernel's backward give q, k, v's gradients as one buffer. Settable at run
    /// time.
    /// </summary>
    public static bool Enabled { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_QKV_STACKED_BASE")?.Trim() == "1";

    /// <summary>
    /// Whether a fused q/k/v block whose input is on CUDA stacks its bases for backward's one dx GEMM (default on;
    /// LORAHUB_QKV_STACKED_BASE=0: off). On an H200 (llama-1b LoRA r16 4×2048): the GEMMs alone 133 µs for one K = 3072
    /// GEMM against 91.5 + 2 × 31.3 µs for q's mm and k's, v's addmm (session 11 call A); steps 91,563 and 91,688 tok/s
    /// against 91,569 and 90,940 (session 10 call G), 90,275 and 89,886 against 89,478, 89,734 and 89,806 (session 11 call
    /// B): +0.4% in both calls, the device's used memory unchanged (11.7 GiB). Session 8's timeline had measured the
    /// three GEMMs at ~150 µs a layer, so it stayed off then. Not on the CPU, where nothing was measured. Settable at run
    /// time.
    /// </summary>
    public static bool OnCuda { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_QKV_STACKED_BASE")?.Trim() != "0";

    /// <summary>
    /// Whether a fused q/k/v block whose outputs carry row scales (DoRA) stacks its bases, forward and backward, even with
    /// <see cref="Enabled"/> off (default on; LORAHUB_QKV_STACKED_BASE=0: off for these too). There the stacked block also
    /// takes one row-scale pass each way instead of three, and the used memory did not grow: on an H200 (llama-1b DoRA r16
    /// 4×2048, session 9) 85,743 and 85,774 tok/s against 85,220 and 85,158 unstacked, in one call (+0.6%), 13.61 GiB
    /// peak against 13.64.
    /// </summary>
    public static bool RowScaled { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_QKV_STACKED_BASE")?.Trim() != "0";

    // Whether the bases of these projections are stacked (and, with forward, their forward GEMM too); the row-scaled
    // default only where the row-scale kernels run on the input (the stacked row-scale passes need them).
    internal static bool Applies(IReadOnlyList<LowRankParts> parts, Tensor? x = null, bool forward = false) =>
        (forward ? Enabled && StackForward : Enabled || OnCuda && (x is null || x.device_type == DeviceType.CUDA))
        || RowScaled && parts.Any(p => p.HasRowScale) && (x is null || x.device_type == DeviceType.CUDA && LoraRowScaleKernels.Enabled);

    /// <summary>
    /// Whether the forward GEMM is stacked too (LORAHUB_QKV_STACKED_FORWARD=1; default off; needs <see cref="Enabled"/>).
    /// Off, the forward keeps one GEMM per base (separate outputs) and only backward's dx is one GEMM. On an H200
    /// (llama-1b LoRA r16 4×2048, session 8 call A, rope epilogue on) the device's used memory was 0.47 GiB higher with
    /// the forward stacked, most likely from its transient (tokens × Σ out) buffer (48 MB a layer, freed right after the
    /// rope epilogue: a block size the caching allocator reuses badly), for a forward gain of ~9 µs a layer. Settable at
    /// run time.
    /// </summary>
    public static bool StackForward { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_QKV_STACKED_FORWARD")?.Trim() == "1";

    private static long forwardGemms, backwardGemms, rehomes;
    private static volatile string? lastMiss;

    /// <summary>Stacked forward GEMMs so far (one per fused q/k/v call that took it).</summary>
    public static long ForwardGemms => Interlocked.Read(ref forwardGemms);

    /// <summary>Backward dx GEMMs that covered two or more projections so far.</summary>
    public static long BackwardGemms => Interlocked.Read(ref backwardGemms);

    /// <summary>Times the weights of a block were re-homed into one storage.</summary>
    public static long Rehomes => Interlocked.Read(ref rehomes);

    /// <summary>One line for logs and benchmarks: the stacked GEMMs so far and why the last unstacked call was not stacked.</summary>
    public static string Report =>
        !Enabled && !OnCuda && !RowScaled ? "off (LORAHUB_QKV_STACKED_BASE=1 turns it on)"
        : $"{(Enabled ? "every block" : OnCuda ? "blocks on CUDA" : "row-scaled blocks")}: {ForwardGemms} forward (stacked forward {(Enabled ? StackForward ? "on" : "off" : "on")}), " +
          $"{BackwardGemms} backward stacked GEMMs, {Rehomes} re-homed" + (lastMiss is { } why ? $"; last unstacked: {why}" : "");

    internal static void Miss(string why) => lastMiss = why;

    /// <summary>
    /// The projections' dense weights as one (Σ out × in) view of their common storage, or null (why in
    /// <paramref name="why"/>). <paramref name="rehome"/>: weights found apart are re-homed first (under no_grad).
    /// </summary>
    internal static Tensor? Weight(IReadOnlyList<LowRankParts> parts, bool rehome, out string? why)
    {
        why = Eligible(parts);
        if (why is not null) return null;
        var weights = parts.Select(p => p.Weight!).ToArray();
        if (View(weights) is { } stacked) return stacked;
        if (!rehome)
        {
            why = "weights not in one storage";
            return null;
        }
        why = Rehome(weights);
        if (why is not null) return null;
        var again = View(weights);
        if (again is null) why = "weights not in one storage after re-homing";
        return again;
    }

    // Null when the parts' bases may be stacked: all dense, frozen, 2-D, one dtype, device and input width, contiguous.
    private static string? Eligible(IReadOnlyList<LowRankParts> parts)
    {
        if (!Applies(parts)) return "off";
        if (parts.Count < 2) return "one projection";
        var first = parts[0].Weight;
        foreach (var p in parts)
        {
            if (p.Weight is not { } w) return "a computed (quantized) base";
            if (w.requires_grad) return "a trainable base";
            if (w.dim() != 2 || !w.is_contiguous()) return "a non-contiguous base";
            if (w.dtype != first!.dtype || w.size(1) != first.size(1) || !torchx.same_device(w, first)) return "bases differ in dtype, device or width";
        }
        return null;
    }

    // The stacked view when each weight starts where the previous ends (one storage spans them: the view is built from
    // the first weight's storage, and libtorch refuses one past its end); else null.
    private static Tensor? View(Tensor[] weights)
    {
        var w0 = weights[0];
        long cols = w0.size(1), es = w0.element_size(), rows = 0;
        var start = torchx.data_ptr(w0);
        foreach (var w in weights)
        {
            if (torchx.data_ptr(w) != start + rows * cols * es) return null;
            rows += w.size(0);
        }
        try
        {
            return w0.as_strided([rows, cols], [cols, 1], w0.storage_offset());
        }
        catch (Exception)
        {
            // Adjacent allocations that are not one storage: re-homed by the caller.
            return null;
        }
    }

    /// <summary>
    /// Makes the weights row blocks of one new (Σ out × in) storage, in order: each weight Parameter is pointed at its block
    /// in place (set_), so their old storages are freed unless something else holds them. Null when done, else why not
    /// (weights that are not Parameters, or overlap). On CUDA the weights are staged through host memory and their device
    /// memory released before the stack is allocated, so the caching allocator can give the stack the memory they free
    /// (three weights allocated one after another leave one hole of the stack's size): the device's reserved memory does
    /// not grow by a stack per block. Elsewhere, or where <see cref="StageThroughHost"/> is off, allocated then copied.
    /// </summary>
    internal static string? Rehome(Tensor[] weights)
    {
        if (weights.Any(w => w is not Parameter)) return "a base that is not a Parameter";
        // Distinct, non-overlapping memory: re-pointing an alias (tied weights) would lose one of them.
        var spans = weights.Select(w => ((long)torchx.data_ptr(w), w.numel() * w.element_size())).OrderBy(s => s.Item1).ToArray();
        for (var i = 1; i < spans.Length; i++)
            if (spans[i - 1].Item1 + spans[i - 1].Item2 > spans[i].Item1) return "bases share memory";
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var w0 = weights[0];
        var (rows, cols, dtype, device) = (weights.Sum(w => w.size(0)), w0.size(1), w0.dtype, w0.device);
        var staged = StageThroughHost && (w0.device_type == DeviceType.CUDA || StageOnCpu);
        // Staged: the values on the host, the device copies released (an empty storage in their place for a moment).
        var sources = staged ? weights.Select(w => w.device_type == DeviceType.CPU ? w.clone() : w.cpu()).ToArray() : weights;
        if (staged)
            foreach (var w in weights) w.set_(empty([0], dtype, device));
        try
        {
            var stack = empty([rows, cols], dtype, device);
            long row = 0;
            var blocks = new Tensor[weights.Length];
            for (var i = 0; i < weights.Length; i++)
            {
                blocks[i] = stack.narrow(0, row, sources[i].size(0));
                blocks[i].copy_(sources[i]);
                row += sources[i].size(0);
            }
            for (var i = 0; i < weights.Length; i++) weights[i].set_(blocks[i]);
        }
        catch (Exception) when (staged)
        {
            // Out of memory for the stack (or a failed copy): the weights back as they were, each on its own.
            for (var i = 0; i < weights.Length; i++) weights[i].set_(sources[i].to(device));
            return "the stack could not be allocated";
        }
        Interlocked.Increment(ref rehomes);
        return null;
    }

    /// <summary>
    /// Whether re-homing on CUDA stages the weights through host memory to free their device memory before the stack is
    /// allocated (default on; LORAHUB_QKV_STACKED_BASE_STAGE=0: the stack is allocated beside them, then they are freed).
    /// </summary>
    public static bool StageThroughHost { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_QKV_STACKED_BASE_STAGE")?.Trim() != "0";

    // Tests: stage CPU weights too (through a copy), so the staged path runs on the CPU.
    internal static bool StageOnCpu { get; set; }

    /// <summary>
    /// The unscaled base outputs x·W_iᵀ (+ b_i where the projection has no row scale, as <see cref="LowRankParts.InnerForward"/>)
    /// as column slices of one (tokens × Σ out) output of one GEMM with the stacked <paramref name="weight"/>.
    /// </summary>
    internal static Tensor[] Forward(IReadOnlyList<LowRankParts> parts, Tensor x, Tensor weight) => Forward(parts, x, weight, out _);

    /// <summary><see cref="Forward(IReadOnlyList{LowRankParts}, Tensor, Tensor)"/>, with the whole (tokens × Σ out) output.</summary>
    internal static Tensor[] Forward(IReadOnlyList<LowRankParts> parts, Tensor x, Tensor weight, out Tensor all)
    {
        var biases = parts.Select(p => p.HasRowScale ? null : p.Bias).ToArray();
        Tensor y;
        if (biases.All(b => b is null)) y = x.mm(weight.t());
        else
        {
            // The bias in addmm's input as BaseForward does; a projection without one adds zeros (exact).
            using var bias = cat(biases.Select((b, i) => b ?? zeros([parts[i].OutFeatures], x.dtype, x.device)).ToList(), 0);
            y = bias.addmm(x, weight.t());
        }
        all = y;
        var outputs = new Tensor[parts.Count];
        long offset = 0;
        for (var i = 0; i < parts.Count; i++)
        {
            outputs[i] = y.narrow(1, offset, parts[i].OutFeatures);
            offset += parts[i].OutFeatures;
        }
        Interlocked.Increment(ref forwardGemms);
        return outputs;
    }

    /// <summary>
    /// The per-column row scale, bias and divisor of stacked outputs (fp32 c and divisor: 1 where a projection has none;
    /// the bias a scaled projection adds after its scale, 0 elsewhere, where the base GEMM added it), for one kernel pass
    /// each way over the whole (tokens × Σ out) buffer instead of one per projection.
    /// </summary>
    internal sealed record Scales(Tensor C, Tensor? Bias, Tensor? Divisor);

    /// <summary>
    /// Applies the projections' row scales c_i (null: none) to the whole stacked output <paramref name="all"/> in one
    /// kernel pass, c ⊙ inner + b with the bits of each projection's own <see cref="LowRankParts.ScaleRows_"/>; returns the
    /// per-column scales, or null where the kernel does not apply (then nothing was done).
    /// </summary>
    internal static Scales? ScaleRows_(IReadOnlyList<LowRankParts> parts, Tensor all, Tensor?[] c, Tensor?[] divisors)
    {
        if (!LoraRowScaleKernels.AppliesTo(all) || !all.is_contiguous()) return null;
        Tensor Column(int i, Tensor? t, ScalarType dtype, double fill) =>
            t is null ? full([parts[i].OutFeatures], fill, dtype, all.device) : t.dtype == dtype ? t : t.to(dtype);
        var n = parts.Count;
        var cAll = cat(Enumerable.Range(0, n).Select(i => Column(i, c[i], ScalarType.Float32, 1)).ToList(), 0);
        var bias = Enumerable.Range(0, n).Any(i => c[i] is not null && parts[i].Bias is not null)
            ? cat(Enumerable.Range(0, n).Select(i => Column(i, c[i] is null ? null : parts[i].Bias, all.dtype, 0)).ToList(), 0)
            : null;
        var divisor = divisors.Any(d => d is not null)
            ? cat(Enumerable.Range(0, n).Select(i => Column(i, divisors[i], ScalarType.Float32, 1)).ToList(), 0)
            : null;
        if (!LoraRowScaleKernels.AppliesToScale(all, cAll, bias)) return null;
        LoraRowScaleKernels.ScaleRows_(all, cAll, bias);
        return new Scales(cAll, bias, divisor);
    }

    /// <summary>
    /// The row-scale backward of stacked outputs in one kernel pass: d(inner) (one new tokens × Σ out buffer) and, with
    /// the scaled output <paramref name="y"/>, every column's dc (divided by the divisor where there is one). The gradients
    /// <paramref name="dys"/> are read as one buffer where they are adjacent column slices of one (as the rope kernel's
    /// backward gives them), else gathered into one first (the kernel reads whole rows: one copy, where per projection a
    /// strided gradient and a strided slice of y would each be copied). Null where the kernel does not apply.
    /// </summary>
    internal static (Tensor dInner, Tensor? dc)? RowScaleBackward(IReadOnlyList<LowRankParts> parts, Tensor[] dys, Tensor? y, Scales scales)
    {
        if (!LoraRowScaleKernels.AppliesTo(dys[0])) return null;
        var adjacent = Enumerable.Range(1, dys.Length - 1).All(i => KernelTensors.AdjacentColumns(dys[i - 1], dys[i]));
        var all = (adjacent ? Columns(dys[0], parts.Sum(p => p.OutFeatures)) : null) ?? cat(dys, 1);
        return LoraRowScaleKernels.RowScaleBackward(all, y, scales.C, scales.Bias, scales.Divisor);
    }

    /// <summary>
    /// dx = Σ_i dy_i·W_i: each run of gradients that are adjacent column slices of one buffer (same dtype, unit column
    /// stride, one row stride, each starting where the previous one ends) as one GEMM with its rows of the stacked
    /// <paramref name="weight"/> (null: one GEMM per projection), the first run by mm and the rest accumulated by addmm.
    /// </summary>
    internal static Tensor InputGrad(IReadOnlyList<LowRankParts> parts, Tensor[] dys, Tensor? weight)
    {
        Tensor? dx = null;
        long row = 0;
        for (var i = 0; i < parts.Count;)
        {
            var j = i + 1;
            long width = parts[i].OutFeatures;
            if (weight is not null)
                while (j < parts.Count && KernelTensors.AdjacentColumns(dys[j - 1], dys[j])) width += parts[j++].OutFeatures;
            var run = j - i > 1 ? Columns(dys[i], width) : null;
            if (run is null) j = i + 1;
            if (run is not null)
            {
                var w = weight!.narrow(0, row, width);
                dx = dx is null ? run.mm(w) : torchx.addmm_(dx, run, w);
                Interlocked.Increment(ref backwardGemms);
            }
            else
            {
                var (dy, acc) = (dys[i], dx);
                dx = acc is null ? parts[i].WithWeight(w => dy.mm(w)) : parts[i].WithWeight(w => torchx.addmm_(acc, dy, w));
            }
            for (; i < j; i++) row += parts[i].OutFeatures;
        }
        return dx!;
    }

    // The (rows × width) block starting at dy's first element with dy's row stride, or null when libtorch refuses it (one
    // past the end of dy's storage) or the rows would overlap.
    private static Tensor? Columns(Tensor dy, long width)
    {
        if (dy.stride(0) < width) return null;
        try
        {
            return dy.as_strided([dy.size(0), width], [dy.stride(0), 1], dy.storage_offset());
        }
        catch (Exception)
        {
            return null;
        }
    }
}
