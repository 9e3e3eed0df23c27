using LoRAHub.TorchExtensions;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace LoRAHub.Tuners.Lora;

/// <summary>
/// A Linear with LoRA adapters: y = base(x) + B·A·dropout(x)·s for the active adapter. Children follow PEFT
/// (base_layer, lora_A.&lt;name&gt;, lora_B.&lt;name&gt;, lora_dropout.&lt;name&gt;), so paths and state-dict keys match it.
/// The base is any Linear-like module (TorchSharp's Linear, Linear4bit, GPT-2's Conv1D: <see cref="ILinearLayer"/>);
/// its weight stays frozen in its own dtype, and the adapter path runs in the activations' dtype. A variant
/// (<see cref="ILoraVariant"/>, e.g. DoRA) may take over forward, merge and unmerge per adapter.
/// </summary>
public sealed partial class LoraLinear : TunerLayer
{
    // Children under PEFT's names, registered in PEFT's order after base_layer (the attributes tell RegisterComponents the same names).
    [ComponentName(Name = "lora_A")] private readonly ModuleDict lora_A_ = new();
    [ComponentName(Name = "lora_B")] private readonly ModuleDict lora_B_ = new();
    [ComponentName(Name = "lora_dropout")] private readonly ModuleDict lora_dropout_ = new();

    private readonly Dictionary<string, (int r, double alpha, double scaling)> settings = new();
    private readonly Dictionary<string, ILoraVariant> variants = new();
    private readonly List<string> merged = new();
    private static long stepTokens;

    public LoraLinear(nn.Module<Tensor, Tensor> baseLayer) : base(nameof(LoraLinear), baseLayer, "LoRA")
    {
        register_module("lora_A", lora_A_);
        register_module("lora_B", lora_B_);
        register_module("lora_dropout", lora_dropout_);
        RegisterComponents();
    }

    public ModuleDict lora_A => lora_A_;
    public ModuleDict lora_B => lora_B_;
    public ModuleDict lora_dropout => lora_dropout_;

    /// <summary>The adapters the forward pass applies, summed in this order (PEFT's active_adapters); empty: none.</summary>
    public IReadOnlyList<string> ActiveAdapters { get; set; } = [];

    /// <summary>
    /// Mixed-batch inference: when set, each batch row uses the adapter its routing names ("__base__": none) instead of the
    /// active adapters (PEFT's _mixed_batch_forward). Set and cleared by <see cref="LoraAdapter.UseAdapterPerRow"/>.
    /// </summary>
    public RowRouting? RowAdapters { get; set; }

    public IReadOnlyList<string> MergedAdapters => merged;
    public override bool Merged => merged.Count > 0;

    protected override bool HasUnmergedWork => RowAdapters is not null || ActiveAdapters.Any(a => !merged.Contains(a) && settings.ContainsKey(a));

    public bool HasAdapter(string name) => settings.ContainsKey(name);
    public int Rank(string name) => settings[name].r;
    public double Alpha(string name) => settings[name].alpha;
    public double Scaling(string name) => settings[name].scaling;
    public Parameter A(string name) => ((Linear)lora_A[name]).weight;
    public Parameter B(string name) => ((Linear)lora_B[name]).weight;

    /// <summary>lora_B's bias (PEFT's lora_bias), or null without one.</summary>
    public Parameter? BBias(string name) => ((Linear)lora_B[name]).bias;

    /// <summary>The adapter's variant (DoRA, ...), or null for plain LoRA.</summary>
    public ILoraVariant? Variant(string name) => variants.GetValueOrDefault(name);

    /// <summary>The variant's extra tensors of the adapter on this layer (none for plain LoRA).</summary>
    public IEnumerable<(string key, Parameter tensor)> VariantTensors(string name) =>
        variants.TryGetValue(name, out var v) ? v.Tensors(this, name) : [];

    // ---- what caches of values derived from the weights key on ----
    //
    // libtorch counts in-place writes per tensor (PyTorch's tensor._version), but TorchSharp does not expose the counter,
    // so a cache cannot notice a write by itself. Instead a cache is exact by construction:
    //  - it lives only inside one training step (StepToken, set by IAdapter.OnStepBegin, cleared by OnStepEnd), where
    //    the weights do not change: the optimizer step that changes A and B comes after the step's forward and backward
    //    passes and before OnStepEnd. Outside a step nothing is cached, so arbitrary writes (a bare optimizer.step(), a
    //    load into live tensors, a hand edit) can never make a cached value stale;
    //  - inside a step, writes that LoRAHub itself makes bump a version (merge, unmerge, AddToBaseWeight: the base;
    //    loads, hot swaps, re-created adapters: the adapter tensors), and keys also hold the tensors' data pointers
    //    (a moved or re-created tensor) and the scaling. Code that writes the weights in place inside a step by other
    //    means calls MarkWeightsChanged().

    /// <summary>Counts in-place writes to the adapter tensors other than optimizer steps (loads, hot swaps, re-creation, <see cref="MarkWeightsChanged"/>).</summary>
    public long AdapterWeightsVersion { get; private set; }

    /// <summary>
    /// Non-null while a training step is in progress (between <c>IAdapter.OnStepBegin</c> and <c>OnStepEnd</c>): a value
    /// unique to that step, under which values derived from the weights may be cached. Null: cache nothing.
    /// </summary>
    public long? StepToken { get; private set; }

    /// <summary>Opens a step: caches keyed on the returned token are valid until <see cref="EndStep"/>.</summary>
    public static long NewStepToken() => Interlocked.Increment(ref stepTokens);

    public void BeginStep(long token) => StepToken = token;

    public void EndStep() => StepToken = null;

    /// <summary>Tells caches that the base weight or adapter tensors were written in place by code other than LoRAHub's.</summary>
    public void MarkWeightsChanged()
    {
        BaseWeightVersion++;
        AdapterWeightsVersion++;
    }

    /// <summary>Tells caches that the adapter tensors were written in place (a load, a hot swap, a weighted combination).</summary>
    public void MarkAdapterWeightsChanged() => AdapterWeightsVersion++;

    /// <summary>
    /// Adds (or re-creates) an adapter: A (r×in), B (out×r) in <paramref name="dtype"/> on the base weight's device; a
    /// variant initialises its own state after A and B (PEFT's update_layer order).
    /// </summary>
    public void UpdateLayer(string name, int r, double alpha, double dropout, bool useRslora, LoraInit init, ScalarType dtype,
        ILoraVariant? variant = null, bool loraBias = false)
    {
        var linear = base_linear;
        var device = linear.weight_device;
        var a = nn.Linear(linear.in_features, r, hasBias: false, device: device, dtype: dtype);
        // PEFT's lora_bias: B gets a bias, added (scaled) to the output and merged into the base bias.
        var b = nn.Linear(r, linear.out_features, hasBias: loraBias, device: device, dtype: dtype);
        using (no_grad())
        {
            // LoftQ starts here too; the adapter then computes A and B (or a quantizing method has and copies them in).
            if (init == LoraInit.Default || init.IsLoftQ)
            {
                // Kaiming-uniform with a = √5 has bound 1/√fan_in (microsoft/LoRA and PEFT).
                var bound = 1.0 / Math.Sqrt(linear.in_features);
                a.weight.uniform_(-bound, bound);
                b.weight.zero_();
                b.bias?.zero_();
            }
            else if (init == LoraInit.Gaussian)
            {
                a.weight.normal_(0, 1.0 / r);
                b.weight.zero_();
                b.bias?.zero_();
            }
            // LoraInit.Random keeps Linear's own init for both, as PEFT does for init_lora_weights=False.
        }
        var drop = nn.Dropout(dropout);
        foreach (var child in new nn.Module[] { a, b, drop }) child.train(training);
        lora_A.Set(name, a);
        lora_B.Set(name, b);
        lora_dropout.Set(name, drop);
        settings[name] = (r, alpha, ScalingFor(r, alpha, useRslora));
        AdapterWeightsVersion++;
        // PiSSA, OLoRA, orthogonal: from the base weight or a random basis, once A, B and the scaling exist.
        LoraInitializers.Apply(this, name, init);
        if (variant is null) variants.Remove(name);
        else
        {
            variants[name] = variant;
            variant.Init(this, name);
        }
    }

    public static double ScalingFor(int r, double alpha, bool useRslora) => useRslora ? alpha / Math.Sqrt(r) : alpha / r;

    /// <summary>Changes alpha/scaling of an existing adapter (hot swap of a config with another alpha).</summary>
    public void SetScaling(string name, double alpha, bool useRslora)
    {
        var r = settings[name].r;
        settings[name] = (r, alpha, ScalingFor(r, alpha, useRslora));
    }

    /// <summary>s·B·A (out×in) in the adapter's dtype.</summary>
    public Tensor DeltaWeight(string name)
    {
        using var scope = NewDisposeScope();
        return B(name).matmul(A(name)).mul(Scaling(name)).MoveToOuterDisposeScope();
    }

    /// <summary>Merges the active adapters this layer has (<see cref="Merge(string)"/>); none active: nothing to do.</summary>
    public override void Merge()
    {
        foreach (var name in ActiveAdapters.Where(HasAdapter).ToList()) Merge(name);
    }

    /// <summary>
    /// Removes an adapter and frees its modules (PEFT's delete_adapter on a layer); merged, it is unmerged first (with
    /// every adapter merged after it, which are merged again).
    /// </summary>
    public void DeleteAdapter(string name)
    {
        if (!settings.ContainsKey(name)) return;
        if (merged.Contains(name))
        {
            var again = merged.Where(m => m != name).ToList();
            Unmerge();
            foreach (var m in again) Merge(m);
        }
        if (variants.Remove(name, out var variant)) variant.Delete(this, name);
        lora_A.Remove(name);
        lora_B.Remove(name);
        lora_dropout.Remove(name);
        settings.Remove(name);
        ActiveAdapters = ActiveAdapters.Where(a => a != name).ToList();
        AdapterWeightsVersion++;
    }

    /// <summary>
    /// W += s·B·A, rounded once to W's storage (PEFT's safe merge); a variant merges its own way. Refused on a 4-bit base
    /// (see <see cref="TunerLayer.CheckInPlaceMerge"/>).
    /// </summary>
    public void Merge(string name, bool safeMerge = false)
    {
        if (merged.Contains(name)) return;
        CheckInPlaceMerge();
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        // PEFT's safe_merge: the merged weight is checked for NaN/inf before the adapter counts as merged.
        var before = safeMerge ? base_linear.dense_weight().clone() : null;
        var loraBias = BBias(name);
        if (loraBias is not null && base_linear.bias is null)
            throw new InvalidOperationException($"impossible to merge LoRA adapter '{name}' with lora_bias=True: the base layer has no bias");
        var biasBefore = safeMerge ? base_linear.bias?.clone() : null;
        if (variants.TryGetValue(name, out var variant)) variant.Merge(this, name);
        else AddToBaseWeight(DeltaWeight(name));
        if (loraBias is not null) base_linear.bias!.add_(loraBias.to(base_linear.bias.dtype).mul(Scaling(name)));
        var broken = before is not null && (!isfinite(base_linear.dense_weight()).all().item<bool>() ||
                                             (base_linear.bias is { } bias && !isfinite(bias).all().item<bool>()));
        if (broken)
        {
            // A dense base's weight (or a view of it) and its bias are written back as they were.
            base_linear.dense_weight().copy_(before!);
            if (biasBefore is not null) base_linear.bias!.copy_(biasBefore);
            BaseWeightVersion++;
            throw new InvalidOperationException($"NaNs detected in the merged weights. The adapter '{name}' seems to be broken (safe merge left the weight as it was)");
        }
        merged.Add(name);
    }

    /// <summary>Subtracts every merged adapter, newest first.</summary>
    public override void Unmerge()
    {
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        for (var i = merged.Count - 1; i >= 0; i--)
        {
            if (variants.TryGetValue(merged[i], out var variant)) variant.Unmerge(this, merged[i]);
            else AddToBaseWeight(DeltaWeight(merged[i]).neg());
            if (BBias(merged[i]) is { } loraBias) base_linear.bias!.sub_(loraBias.to(base_linear.bias.dtype).mul(Scaling(merged[i])));
        }
        merged.Clear();
    }

    protected override Tensor AdaptedForward(Tensor input)
    {
        if (RowAdapters is { } rows) return MixedBatchForward(input, rows);
        using var scope = NewDisposeScope();
        var result = base_layer.call(input);
        foreach (var name in ActiveAdapters)
            if (settings.ContainsKey(name) && !merged.Contains(name)) result = AdapterForward(name, input, result);
        return result.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Row i of the batch with adapter rows[i] (PEFT's _mixed_batch_forward): the base output for the whole batch, then
    /// each adapter's rows gathered, adapted and put back. "__base__" rows and adapters this layer lacks keep the base output.
    /// </summary>
    private Tensor MixedBatchForward(Tensor input, RowRouting rows)
    {
        if (input.size(0) != rows.Count)
            throw new InvalidOperationException($"the batch has {input.size(0)} rows but {rows.Count} row adapters were given (UseAdapterPerRow)");
        using var scope = NewDisposeScope();
        var result = base_layer.call(input);
        foreach (var (name, index) in rows.Groups(input.device))
        {
            if (!settings.ContainsKey(name)) continue;
            var adapted = AdapterForward(name, input.index_select(0, index), result.index_select(0, index));
            result = result.index_copy(0, index, adapted.to(result.dtype));
        }
        return result.MoveToOuterDisposeScope();
    }

    /// <summary><paramref name="result"/> with adapter <paramref name="name"/>'s update added (a variant computes its own).</summary>
    private Tensor AdapterForward(string name, Tensor input, Tensor result)
    {
        if (variants.TryGetValue(name, out var variant)) return variant.Forward(this, name, input, result);
        using var scope = NewDisposeScope();
        Tensor a = A(name), b = B(name);
        // Mixed precision: the trainable A and B stay fp32 (master weights and optimizer state), but the matmuls run in
        // the activations' dtype, so bf16 activations are never widened to fp32. Casting the small r×in / out×r
        // matrices is cheap; autograd carries their gradients back to fp32.
        var computeType = input.dtype;
        if (a.dtype != computeType) a = a.to(computeType);
        if (b.dtype != computeType) b = b.to(computeType);
        var xa = nn.functional.linear(((nn.Module<Tensor, Tensor>)lora_dropout[name]).call(input), a);
        // result + s·(xa·Bᵀ) as one GEMM with accumulation (addmm) over the flattened tokens.
        var outFeatures = result.size(-1);
        var sum = torchx.addmm(result.reshape(-1, outFeatures), xa.reshape(-1, xa.size(-1)), b.t(), beta: 1.0, alpha: Scaling(name));
        if (BBias(name) is { } loraBias) sum = sum.add(loraBias.to(computeType).mul(Scaling(name)));
        return sum.view(result.shape).MoveToOuterDisposeScope();
    }
}
