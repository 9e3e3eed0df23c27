using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoRAHub.Tests.Shared;

using F = TorchSharp.torch.nn.functional;

/// <summary>
/// A miniature decoder with transformers-style names (model.embed_tokens, model.layers.N.self_attn.{q,v,o}_proj,
/// lm_head) for the method plugins' tests, written as a plain TorchSharp model: children are fields typed
/// Module&lt;Tensor, Tensor&gt;, so an adapter can swap them (replace_submodule). Each block is
/// h += o_proj(silu(q_proj(h)) · v_proj(h)). Its device is where the embedding lives, so a method (QLoRA) can move it;
/// `hidden` 64 makes it wide enough for 4-bit blocks of 64.
/// </summary>
public sealed class TinyModel : nn.Module<Tensor, Tensor>, IAdaptableModel
{
    public const int Vocab = 11, DefaultHidden = 8;

    // Fields named as the modules (TorchSharp's RegisterComponents), in creation order, which fixes the random init.
    // Swappable children are not readonly: replace_submodule sets them.
    private readonly Inner model;
    private nn.Module<Tensor, Tensor> lm_head;

    public TinyModel(long seed = 0, ScalarType dtype = ScalarType.Float32, bool bias = false, Device? device = null, int hidden = DefaultHidden)
        : base(nameof(TinyModel))
    {
        torchx.manual_seed(seed);
        var dev = device ?? CPU;
        model = new Inner(hidden, bias, dtype, dev);
        lm_head = nn.Linear(hidden, Vocab, hasBias: false, device: dev, dtype: dtype);
        RegisterComponents();
        DType = dtype;
        Hidden = hidden;
    }

    private sealed class Inner : nn.Module
    {
        public nn.Module<Tensor, Tensor> embed_tokens;
        public readonly ModuleList<Block> layers;

        public Inner(int hidden, bool bias, ScalarType dtype, Device device) : base("TinyInner")
        {
            embed_tokens = nn.Embedding(Vocab, hidden, device: device, dtype: dtype);
            layers = nn.ModuleList(new Block(hidden, bias, dtype, device), new Block(hidden, bias, dtype, device));
            RegisterComponents();
        }
    }

    private sealed class Block : nn.Module
    {
        public readonly SelfAttention self_attn;

        public Block(int hidden, bool bias, ScalarType dtype, Device device) : base("TinyBlock")
        {
            self_attn = new SelfAttention(hidden, bias, dtype, device);
            RegisterComponents();
        }
    }

    private sealed class SelfAttention : nn.Module
    {
        public nn.Module<Tensor, Tensor> q_proj, v_proj, o_proj;

        public SelfAttention(int hidden, bool bias, ScalarType dtype, Device device) : base("TinyAttention")
        {
            q_proj = nn.Linear(hidden, hidden, bias, device, dtype);
            v_proj = nn.Linear(hidden, hidden, bias, device, dtype);
            o_proj = nn.Linear(hidden, hidden, bias, device, dtype);
            RegisterComponents();
        }
    }

    public nn.Module Root => this;
    public Device Device => model.embed_tokens.parameters().First().device;
    public ScalarType DType { get; }
    public int Hidden { get; }
    public string ModelType => "tiny";
    public string NameOrPath => "tests/tiny-model";
    public IReadOnlyList<string> OutputModuleNames => ["lm_head"];
    public AttentionFunction Attention { get; set; } = (q, k, v, m) => torchx.nn.functional.scaled_dot_product_attention(q, k, v, is_causal: true);

    public static readonly string[] Projections = ["q_proj", "v_proj", "o_proj"];

    /// <summary>Logits (batch, seq, vocab).</summary>
    public Tensor Forward(Tensor ids) => forward(ids);

    public override Tensor forward(Tensor ids)
    {
        using var scope = NewDisposeScope();
        var h = model.embed_tokens.call(ids);
        foreach (var layer in model.layers)
        {
            var a = layer.self_attn;
            h = h + a.o_proj.call(a.q_proj.call(h).silu() * a.v_proj.call(h));
        }
        return lm_head.call(h).MoveToOuterDisposeScope();
    }

    public Tensor Loss(Tensor ids, Tensor targets)
    {
        using var scope = NewDisposeScope();
        var logits = Forward(ids).to(ScalarType.Float32);
        return F.cross_entropy(logits.reshape(-1, Vocab), targets.reshape(-1)).MoveToOuterDisposeScope();
    }

    /// <summary>Random token ids (batch × length).</summary>
    public static Tensor Batch(long seed = 1, Device? device = null, long batch = 2, long length = 5)
    {
        torchx.manual_seed(seed);
        return randint(Vocab, [batch, length], device: device ?? CPU);
    }
}
