using LoRAHub.Torch.NN;

namespace LoRAHub.Plugins.Tests;

using F = torch.nn.functional;

/// <summary>A two-block regression model with transformers-like names (self_attn / mlp) for method tests.</summary>
public sealed class TinyBlockModel : Module, IAdaptableModel
{
    public TinyBlockModel(int dim = 8, long seed = 0, Device? device = null) : base("TinyBlockModel")
    {
        torch.manual_seed(seed);
        for (var i = 0; i < 2; i++)
        {
            var attn = new Sequential(new Linear(dim, dim));
            register_module($"attn{i}", attn);
            register_module($"mlp{i}", new Linear(dim, dim * 2));
            register_module($"down{i}", new Linear(dim * 2, dim));
            register_module($"norm{i}", new RMSNorm(dim));
        }
        register_module("head", new Linear(dim, 1));
        to(device ?? Device.CPU);
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = torch.NewDisposeScope();
        var h = x;
        for (var i = 0; i < 2; i++)
        {
            h = h + Child<Module>($"attn{i}").forward(Child<Module>($"norm{i}").forward(h));
            h = h + Child<Module>($"down{i}").forward(Child<Module>($"mlp{i}").forward(h).silu());
        }
        return Child<Module>("head").forward(h).MoveToOuterDisposeScope();
    }

    public Module Root => this;
    public Device Device => parameters().First().device;
    public ScalarType DType => ScalarType.Float32;
    public string ModelType => "tiny";
    public string NameOrPath => "tiny";
    public IReadOnlyList<string> OutputModuleNames => ["head"];
    public AttentionFunction Attention { get; set; } = (q, k, v, m) => F.scaled_dot_product_attention(q, k, v, is_causal: true);
}
