using LoRAHub.Torch;
using LoRAHub.Torch.NN;

namespace LoRAHub.Plugins.LoRA;

/// <summary>
/// A Linear with LoRA adapters: y = base(x) + B·A·dropout(x)·s for the active adapter. Children follow PEFT
/// (base_layer, lora_A.&lt;name&gt;, lora_B.&lt;name&gt;, lora_dropout.&lt;name&gt;), so paths and state-dict keys match it.
/// The base weight stays frozen in its own dtype; the adapter path runs in the adapter's dtype.
/// </summary>
public sealed class LoraLinear : Module
{
    private readonly Dictionary<string, (int r, double alpha, double scaling)> settings = new();
    private readonly Dictionary<string, ILoraVariant> variants = new();
    private readonly List<string> merged = new();

    public LoraLinear(Module baseLayer) : base("LoraLinear")
    {
        if (baseLayer is not ILinearLayer)
            throw new ArgumentException($"LoRA wraps Linear layers (dense or quantized); got a {baseLayer.TypeName}", nameof(baseLayer));
        register_module("base_layer", baseLayer);
        register_module("lora_A", new ModuleDict());
        register_module("lora_B", new ModuleDict());
        register_module("lora_dropout", new ModuleDict());
    }

    public Module base_layer => Child<Module>("base_layer");

    /// <summary>The wrapped layer as a linear map (dense or quantized weight).</summary>
    public ILinearLayer base_linear => (ILinearLayer)base_layer;
    public ModuleDict lora_A => Child<ModuleDict>("lora_A");
    public ModuleDict lora_B => Child<ModuleDict>("lora_B");
    public ModuleDict lora_dropout => Child<ModuleDict>("lora_dropout");

    /// <summary>The adapter the forward pass applies, or null for none.</summary>
    public string? ActiveAdapter { get; set; }

    /// <summary>False: forward is exactly the base layer.</summary>
    public bool AdaptersEnabled { get; set; } = true;

    public IReadOnlyList<string> MergedAdapters => merged;
    public bool Merged => merged.Count > 0;

    public bool HasAdapter(string name) => settings.ContainsKey(name);
    public int Rank(string name) => settings[name].r;
    public double Alpha(string name) => settings[name].alpha;
    public double Scaling(string name) => settings[name].scaling;
    public Tensor A(string name) => ((Linear)lora_A[name]).weight;
    public Tensor B(string name) => ((Linear)lora_B[name]).weight;

    /// <summary>The adapter's variant (DoRA, ...), or null for plain LoRA.</summary>
    public ILoraVariant? Variant(string name) => variants.GetValueOrDefault(name);

    /// <summary>The variant's extra tensors of the adapter on this layer (none for plain LoRA).</summary>
    public IEnumerable<(string key, Tensor tensor)> VariantTensors(string name) =>
        variants.TryGetValue(name, out var v) ? v.Tensors(this, name) : [];

    /// <summary>Counts writes to the base weight through this layer, so variants can tell when a cache of W is stale.</summary>
    public long BaseWeightVersion { get; private set; }

    /// <summary>W += delta on the base layer (dense or quantized).</summary>
    public void AddToBaseWeight(Tensor delta)
    {
        base_linear.add_to_weight_(delta);
        BaseWeightVersion++;
    }

    /// <summary>
    /// Adds (or re-creates) an adapter: A (r×in), B (out×r) in <paramref name="dtype"/> on the base weight's device; a
    /// variant initialises its own state after A and B (PEFT's update_layer order).
    /// </summary>
    public void UpdateLayer(string name, int r, double alpha, double dropout, bool useRslora, LoraInit init, ScalarType dtype,
        ILoraVariant? variant = null)
    {
        var device = base_linear.weight_device;
        var a = new Linear(base_linear.in_features, r, hasBias: false, dtype, device);
        var b = new Linear(r, base_linear.out_features, hasBias: false, dtype, device);
        using (torch.no_grad())
        {
            if (init == LoraInit.Default)
            {
                // Kaiming-uniform with a = √5 has bound 1/√fan_in (microsoft/LoRA and PEFT).
                var bound = 1.0 / Math.Sqrt(base_linear.in_features);
                a.weight.uniform_(-bound, bound);
                b.weight.zero_();
            }
            else if (init == LoraInit.Gaussian)
            {
                a.weight.normal_(0, 1.0 / r);
                b.weight.zero_();
            }
            // LoraInit.Random keeps Linear's own init for both, as PEFT does for init_lora_weights=False.
        }
        lora_A.Set(name, a);
        lora_B.Set(name, b);
        lora_dropout.Set(name, new Dropout(dropout));
        settings[name] = (r, alpha, ScalingFor(r, alpha, useRslora));
        if (!training) lora_dropout[name].eval();
        if (variant == null) variants.Remove(name);
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
        using var scope = torch.NewDisposeScope();
        return B(name).matmul(A(name)).mul(Scaling(name)).MoveToOuterDisposeScope();
    }

    /// <summary>W += s·B·A, rounded once to W's storage (PEFT's safe merge); a variant merges its own way.</summary>
    public void Merge(string name)
    {
        if (merged.Contains(name)) return;
        using var _ = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        if (variants.TryGetValue(name, out var variant)) variant.Merge(this, name);
        else AddToBaseWeight(DeltaWeight(name));
        merged.Add(name);
    }

    /// <summary>Subtracts every merged adapter, newest first.</summary>
    public void Unmerge()
    {
        using var _ = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        for (var i = merged.Count - 1; i >= 0; i--)
        {
            if (variants.TryGetValue(merged[i], out var variant)) variant.Unmerge(this, merged[i]);
            else AddToBaseWeight(DeltaWeight(merged[i]).neg());
        }
        merged.Clear();
    }

    public override Tensor forward(Tensor input)
    {
        var active = ActiveAdapter;
        if (!AdaptersEnabled || Merged || active == null || !settings.ContainsKey(active)) return base_layer.forward(input);
        using var scope = torch.NewDisposeScope();
        var result = base_layer.forward(input);
        if (variants.TryGetValue(active, out var variant)) return variant.Forward(this, active, input, result).MoveToOuterDisposeScope();
        var a = ((Linear)lora_A[active]).weight;
        var b = ((Linear)lora_B[active]).weight;
        // Mixed precision: the trainable A and B stay fp32 (master weights and optimizer state), but the matmuls run in
        // the activations' dtype, so bf16 activations are never widened to fp32. Casting the small r×in / out×r
        // matrices is cheap; autograd carries their gradients back to fp32.
        var computeType = input.dtype;
        if (a.dtype != computeType) a = a.to(computeType);
        if (b.dtype != computeType) b = b.to(computeType);
        var xa = torch.nn.functional.linear(lora_dropout[active].forward(input), a);
        // result + s·(xa·Bᵀ) as one GEMM with accumulation (addmm) over the flattened tokens.
        var outFeatures = result.size(-1);
        var sum = result.reshape(-1, outFeatures).addmm(xa.reshape(-1, xa.size(-1)), b.t(), beta: 1.0, alpha: Scaling(active));
        return sum.view(result.shape).MoveToOuterDisposeScope();
    }

    /// <summary>Frees the adapter tensors only (every child but base_layer, variants' included); the base layer stays alive (it goes back into the model on unload).</summary>
    public override void Dispose()
    {
        foreach (var (name, child) in named_children())
            if (name != "base_layer") child.Dispose();
        GC.SuppressFinalize(this);
    }
}
