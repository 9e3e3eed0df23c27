namespace LoRAHub.Plugins.Tests;

using F = torch.nn.functional;

/// <summary>A two-block regression model with transformers-like names (self_attn / mlp) for method tests.</summary>
public sealed class TinyBlockModel : nn.Module<Tensor, Tensor>, IAdaptableModel
{
    // Children are fields (registered by name) so a method can swap any of them.
    private nn.Module<Tensor, Tensor> attn0, mlp0, down0, norm0, attn1, mlp1, down1, norm1, head;

    public TinyBlockModel(int dim = 8, long seed = 0, Device? device = null) : base("TinyBlockModel")
    {
        torchx.manual_seed(seed);
        attn0 = nn.Sequential(nn.Linear(dim, dim));
        mlp0 = nn.Linear(dim, dim * 2);
        down0 = nn.Linear(dim * 2, dim);
        norm0 = torchx.nn.RMSNorm(dim);
        attn1 = nn.Sequential(nn.Linear(dim, dim));
        mlp1 = nn.Linear(dim, dim * 2);
        down1 = nn.Linear(dim * 2, dim);
        norm1 = torchx.nn.RMSNorm(dim);
        head = nn.Linear(dim, 1);
        RegisterComponents();
        this.to(device ?? torch.CPU);
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = torch.NewDisposeScope();
        var h = x;
        foreach (var (attn, norm, mlp, down) in new[] { (attn0, norm0, mlp0, down0), (attn1, norm1, mlp1, down1) })
        {
            h = h + attn.forward(norm.forward(h));
            h = h + down.forward(mlp.forward(h).silu());
        }
        return head.forward(h).MoveToOuterDisposeScope();
    }

    public nn.Module Root => this;
    public Device Device => parameters().First().device;
    public ScalarType DType => ScalarType.Float32;
    public string ModelType => "tiny";
    public string NameOrPath => "tiny";
    public IReadOnlyList<string> OutputModuleNames => ["head"];
    public AttentionFunction Attention { get; set; } = (q, k, v, m) => F.scaled_dot_product_attention(q, k, v, is_casual: true);
}
