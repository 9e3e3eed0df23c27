using LoRAHub.Torch.NN;

namespace LoRAHub.Tests.Shared;

using F = torch.nn.functional;

/// <summary>
/// A miniature decoder with transformers-style names (model.embed_tokens, model.layers.N.self_attn.{q,v,o}_proj,
/// lm_head) for the method plugins' tests. Each block is h += o_proj(silu(q_proj(h)) · v_proj(h)). Its device is where
/// the embedding lives, so a method (QLoRA) can move it; `hidden` 64 makes it wide enough for 4-bit blocks of 64.
/// </summary>
public sealed class TinyModel : Module, IAdaptableModel
{
    public const int Vocab = 11, DefaultHidden = 8;

    public TinyModel(long seed = 0, ScalarType dtype = ScalarType.Float32, bool bias = false, Device? device = null, int hidden = DefaultHidden) : base("TinyModel")
    {
        torch.manual_seed(seed);
        var dev = device ?? Device.CPU;
        var inner = new Inner();
        inner.register_module("embed_tokens", new Embedding(Vocab, hidden, dtype, dev));
        var blocks = new ModuleList();
        for (var i = 0; i < 2; i++)
        {
            var attn = new Block();
            attn.register_module("q_proj", new Linear(hidden, hidden, bias, dtype, dev));
            attn.register_module("v_proj", new Linear(hidden, hidden, bias, dtype, dev));
            attn.register_module("o_proj", new Linear(hidden, hidden, bias, dtype, dev));
            var layer = new Block();
            layer.register_module("self_attn", attn);
            blocks.append(layer);
        }
        inner.register_module("layers", blocks);
        register_module("model", inner);
        register_module("lm_head", new Linear(hidden, Vocab, false, dtype, dev));
        DType = dtype;
        Hidden = hidden;
    }

    private sealed class Inner() : Module("TinyInner");
    private sealed class Block() : Module("TinyBlock");

    public Module Root => this;
    public Device Device => ((Embedding)get_submodule("model.embed_tokens")!).weight.device;
    public ScalarType DType { get; }
    public int Hidden { get; }
    public string ModelType => "tiny";
    public string NameOrPath => "tests/tiny-model";
    public IReadOnlyList<string> OutputModuleNames => ["lm_head"];
    public AttentionFunction Attention { get; set; } = (q, k, v, m) => F.scaled_dot_product_attention(q, k, v, is_causal: true);

    private Module At(string path) => get_submodule(path)!;

    public static readonly string[] Projections = ["q_proj", "v_proj", "o_proj"];

    /// <summary>Logits (batch, seq, vocab).</summary>
    public Tensor Forward(Tensor ids)
    {
        using var scope = torch.NewDisposeScope();
        var h = At("model.embed_tokens").forward(ids);
        for (var i = 0; i < 2; i++)
        {
            var p = $"model.layers.{i}.self_attn.";
            h = h + At(p + "o_proj").forward(At(p + "q_proj").forward(h).silu() * At(p + "v_proj").forward(h));
        }
        return At("lm_head").forward(h).MoveToOuterDisposeScope();
    }

    public Tensor Loss(Tensor ids, Tensor targets)
    {
        using var scope = torch.NewDisposeScope();
        var logits = Forward(ids).to(ScalarType.Float32);
        return F.cross_entropy(logits.reshape(-1, Vocab), targets.reshape(-1)).MoveToOuterDisposeScope();
    }

    /// <summary>Random token ids (batch × length).</summary>
    public static Tensor Batch(long seed = 1, Device? device = null, long batch = 2, long length = 5)
    {
        torch.manual_seed(seed);
        return torch.randint(Vocab, [batch, length], device: device ?? Device.CPU);
    }
}
