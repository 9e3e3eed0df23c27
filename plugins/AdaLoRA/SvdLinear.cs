using LoRAHub.Torch;
using LoRAHub.Torch.NN;

namespace LoRAHub.Plugins.AdaLoRA;

using F = torch.nn.functional;

/// <summary>
/// A Linear with an SVD-shaped adapter (PEFT's SVDLinear): y = base(x) + dropout(x)·(A⊙E)ᵀ·Bᵀ · α/(ranknum + 1e-5), with
/// A (r×in) right singular vectors, E (r×1) singular values and B (out×r) left singular vectors. Children follow PEFT
/// (base_layer, lora_A.default, lora_E.default, lora_B.default), so state-dict keys match it.
/// </summary>
public sealed class SvdLinear : Module
{
    public const string Adapter = "default";

    // PEFT keeps A, E and B in ParameterDicts: the parameter's path is lora_A.default (no ".weight").
    private sealed class Holder : Module
    {
        public Holder(string name, Tensor value, bool requiresGrad) : base("ParameterDict") => Value = register_parameter(name, value, requiresGrad);

        public Tensor Value { get; }
    }

    public SvdLinear(Module baseLayer, int r, double alpha, double dropout) : base("SVDLinear")
    {
        if (baseLayer is not ILinearLayer linear)
            throw new ArgumentException($"AdaLoRA wraps Linear layers; got a {baseLayer.TypeName}", nameof(baseLayer));
        register_module("base_layer", baseLayer);
        var device = linear.weight_device;
        // PEFT's init: E = 0 (the layer starts as the base), A and B ~ N(0, 0.02).
        register_module("lora_A", new Holder(Adapter, torch.randn([r, linear.in_features], device: device).mul_(0.02), true));
        register_module("lora_E", new Holder(Adapter, torch.zeros([r, 1], device: device), true));
        register_module("lora_B", new Holder(Adapter, torch.randn([linear.out_features, r], device: device).mul_(0.02), true));
        register_module("lora_dropout", new Dropout(dropout));
        Rank = r;
        RankNum = r;
        Alpha = alpha;
    }

    public Module base_layer => Child<Module>("base_layer");
    public ILinearLayer base_linear => (ILinearLayer)base_layer;
    public Tensor A => Child<Holder>("lora_A").Value;
    public Tensor E => Child<Holder>("lora_E").Value;
    public Tensor B => Child<Holder>("lora_B").Value;

    /// <summary>Number of triplets (rows of A).</summary>
    public int Rank { get; }

    /// <summary>PEFT's ranknum: the divisor of the scale, the rank the layer was created with.</summary>
    public double RankNum { get; set; }

    public double Alpha { get; }

    public double Scaling => Alpha / (RankNum + 1e-5);

    public bool Enabled { get; set; } = true;

    public bool Merged { get; private set; }

    /// <summary>B·(A⊙E)·scaling (out×in), fp32.</summary>
    public Tensor DeltaWeight()
    {
        using var scope = torch.NewDisposeScope();
        return B.matmul(A.mul(E)).mul(Scaling).MoveToOuterDisposeScope();
    }

    public void Merge()
    {
        if (Merged) return;
        using var scope = torch.NewDisposeScope();
        base_linear.add_to_weight_(DeltaWeight());
        Merged = true;
    }

    public void Unmerge()
    {
        if (!Merged) return;
        using var scope = torch.NewDisposeScope();
        base_linear.add_to_weight_(DeltaWeight().neg());
        Merged = false;
    }

    public override Tensor forward(Tensor input)
    {
        // A layer whose every triplet was pruned (rank 0, as PEFT allows) is the base layer.
        if (!Enabled || Merged || Rank == 0) return base_layer.forward(input);
        using var scope = torch.NewDisposeScope();
        var result = base_layer.forward(input);
        var dtype = input.dtype;
        var ae = A.mul(E);
        var b = B;
        if (ae.dtype != dtype) ae = ae.to(dtype);
        if (b.dtype != dtype) b = b.to(dtype);
        var xa = F.linear(Child<Module>("lora_dropout").forward(input), ae);
        var outFeatures = result.size(-1);
        var sum = result.reshape(-1, outFeatures).addmm(xa.reshape(-1, xa.size(-1)), b.t(), beta: 1.0, alpha: Scaling);
        return sum.view(result.shape).MoveToOuterDisposeScope();
    }

    /// <summary>Frees the adapter tensors only; the base layer goes back into the model on unload.</summary>
    public override void Dispose()
    {
        foreach (var name in new[] { "lora_A", "lora_E", "lora_B" }) Child<Module>(name).Dispose();
        GC.SuppressFinalize(this);
    }
}
