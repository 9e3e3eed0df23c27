namespace LoRAHub.Torch.NN;

using F = torch.nn.functional;

/// <summary>y = x·Wᵀ + b, with PyTorch's default initialisation (Kaiming-uniform, a = √5).</summary>
public sealed class Linear : Module, ILinearLayer
{
    public Linear(long in_features, long out_features, bool hasBias = true, ScalarType? dtype = null, Device? device = null) : base("Linear")
    {
        in_features_ = in_features;
        out_features_ = out_features;
        var bound = 1.0 / Math.Sqrt(in_features);
        register_parameter("weight", torch.empty([out_features, in_features], dtype, device).uniform_(-bound, bound));
        if (hasBias) register_parameter("bias", torch.empty([out_features], dtype, device).uniform_(-bound, bound));
    }

    private readonly long in_features_, out_features_;
    public long in_features => in_features_;
    public long out_features => out_features_;
    public Tensor weight => Parameter("weight");
    public Tensor? bias => OptionalParameter("bias");

    public Device weight_device => weight.device;
    public ScalarType weight_dtype => weight.dtype;
    public Tensor dense_weight() => weight;

    public void add_to_weight_(Tensor delta)
    {
        using var _ = torch.no_grad();
        weight.add_(delta.dtype == weight.dtype ? delta : delta.to(weight.dtype));
    }

    public override Tensor forward(Tensor input) => F.linear(input, weight, bias);
}

/// <summary>A lookup table of embeddings, initialised N(0, 1) as in PyTorch.</summary>
public sealed class Embedding : Module
{
    public Embedding(long num_embeddings, long embedding_dim, ScalarType? dtype = null, Device? device = null) : base("Embedding") =>
        register_parameter("weight", torch.randn([num_embeddings, embedding_dim], dtype, device));

    public Tensor weight => Parameter("weight");

    public override Tensor forward(Tensor input) => F.embedding(input, weight);
}

/// <summary>Root-mean-square normalisation with a learned scale (Llama).</summary>
public sealed class RMSNorm : Module
{
    public RMSNorm(long dim, double eps = 1e-6, ScalarType? dtype = null, Device? device = null) : base("RMSNorm")
    {
        this.eps = eps;
        register_parameter("weight", torch.ones([dim], dtype, device));
    }

    public double eps { get; }
    public Tensor weight => Parameter("weight");

    public override Tensor forward(Tensor input) => F.rms_norm(input, weight, eps);
}

/// <summary>Layer normalisation over the last dimension with learned scale and shift.</summary>
public sealed class LayerNorm : Module
{
    private readonly long dim;

    public LayerNorm(long dim, double eps = 1e-5, bool elementwise_affine = true, ScalarType? dtype = null, Device? device = null) : base("LayerNorm")
    {
        this.dim = dim;
        this.eps = eps;
        if (!elementwise_affine) return;
        register_parameter("weight", torch.ones([dim], dtype, device));
        register_parameter("bias", torch.zeros([dim], dtype, device));
    }

    public double eps { get; }
    public Tensor? weight => OptionalParameter("weight");
    public Tensor? bias => OptionalParameter("bias");

    public override Tensor forward(Tensor input) => F.layer_norm(input, [dim], weight, bias, eps);
}

/// <summary>Zeroes elements with probability p during training and rescales the rest.</summary>
public sealed class Dropout(double p = 0.5) : Module("Dropout")
{
    public double p { get; } = p;

    public override Tensor forward(Tensor input) => p == 0 || !training ? input.alias() : F.dropout(input, p, true);
}

/// <summary>Submodules named "0", "1", ... (torch.nn.ModuleList).</summary>
public sealed class ModuleList : Module
{
    private int count;

    public ModuleList(IEnumerable<Module>? items = null) : base("ModuleList")
    {
        foreach (var m in items ?? []) append(m);
    }

    public void append(Module m) => register_module((count++).ToString(), m);
    public int Count => count;
    public Module this[int index] => Child<Module>(index.ToString());
}

/// <summary>Applies its children in order.</summary>
public sealed class Sequential : Module
{
    private int count;

    public Sequential(params Module[] items) : base("Sequential")
    {
        foreach (var m in items) register_module((count++).ToString(), m);
    }

    public override Tensor forward(Tensor input)
    {
        var x = input;
        for (var i = 0; i < count; i++)
        {
            var y = Child<Module>(i.ToString()).forward(x);
            if (!ReferenceEquals(x, input)) x.Dispose();
            x = y;
        }
        return ReferenceEquals(x, input) ? input.alias() : x;
    }
}
