using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoRAHub.Samples.OwnModel;

/// <summary>
/// A user's own decoder, written with nothing but TorchSharp modules and knowing nothing of LoRAHub: token and position
/// embeddings, pre-norm blocks (causal self-attention + GELU MLP), a final norm and a head. The one thing it does for
/// adapters is type the layers they may wrap as Module&lt;Tensor, Tensor&gt; (not Linear) and leave those fields writable,
/// so a method can put a LoRA layer in their place; forward calls whatever the field holds.
/// </summary>
public sealed class TinyTransformer : nn.Module<Tensor, Tensor>
{
    public sealed record Config(int Vocab = 32, int Dim = 32, int Heads = 4, int Layers = 2, int MaxLength = 64);

    private readonly Embedding tok_emb, pos_emb;
    private readonly ModuleList<Block> blocks;
    private readonly LayerNorm ln_f;
    private nn.Module<Tensor, Tensor> head;

    public TinyTransformer(Config config, long seed = 0, Device? device = null) : base(nameof(TinyTransformer))
    {
        // Same seed, same weights: a second instance is an exact copy of the base model. The weights are drawn on the CPU
        // and then moved, because TorchSharp's manual_seed seeds only the CPU generator: layers created on a GPU would be
        // initialised from the CUDA generator, which it leaves running. This way a seed also gives the same model on
        // every device.
        torch.manual_seed(seed);
        Settings = config;
        tok_emb = nn.Embedding(config.Vocab, config.Dim);
        pos_emb = nn.Embedding(config.MaxLength, config.Dim);
        blocks = nn.ModuleList(Enumerable.Range(0, config.Layers).Select(_ => new Block(config)).ToArray());
        ln_f = nn.LayerNorm(config.Dim);
        head = nn.Linear(config.Dim, config.Vocab, hasBias: false);
        RegisterComponents();
        if (device is not null) this.to(device);
    }

    public Config Settings { get; }

    /// <summary>Logits (batch, seq, vocab) for token ids (batch, seq).</summary>
    public override Tensor forward(Tensor ids)
    {
        using var scope = NewDisposeScope();
        var positions = arange(ids.size(1), device: ids.device);
        var h = tok_emb.call(ids) + pos_emb.call(positions);
        foreach (var block in blocks) h = block.call(h);
        return head.call(ln_f.call(h)).MoveToOuterDisposeScope();
    }

    public sealed class Block : nn.Module<Tensor, Tensor>
    {
        private readonly LayerNorm ln_1, ln_2;
        private readonly CausalSelfAttention attn;
        private readonly Mlp mlp;

        public Block(Config config) : base(nameof(Block))
        {
            ln_1 = nn.LayerNorm(config.Dim);
            attn = new CausalSelfAttention(config);
            ln_2 = nn.LayerNorm(config.Dim);
            mlp = new Mlp(config);
            RegisterComponents();
        }

        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            x = x + attn.call(ln_1.call(x));
            return (x + mlp.call(ln_2.call(x))).MoveToOuterDisposeScope();
        }
    }

    public sealed class CausalSelfAttention : nn.Module<Tensor, Tensor>
    {
        private readonly int heads;
        private nn.Module<Tensor, Tensor> q_proj, k_proj, v_proj, out_proj;

        public CausalSelfAttention(Config config) : base(nameof(CausalSelfAttention))
        {
            heads = config.Heads;
            q_proj = nn.Linear(config.Dim, config.Dim);
            k_proj = nn.Linear(config.Dim, config.Dim);
            v_proj = nn.Linear(config.Dim, config.Dim);
            out_proj = nn.Linear(config.Dim, config.Dim);
            RegisterComponents();
        }

        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            long b = x.size(0), t = x.size(1), d = x.size(2);
            Tensor Split(Tensor y) => y.view(b, t, heads, d / heads).transpose(1, 2);
            var y = nn.functional.scaled_dot_product_attention(Split(q_proj.call(x)), Split(k_proj.call(x)), Split(v_proj.call(x)), is_casual: true);
            return out_proj.call(y.transpose(1, 2).reshape(b, t, d)).MoveToOuterDisposeScope();
        }
    }

    public sealed class Mlp : nn.Module<Tensor, Tensor>
    {
        private nn.Module<Tensor, Tensor> fc1, fc2;

        public Mlp(Config config) : base(nameof(Mlp))
        {
            fc1 = nn.Linear(config.Dim, 4 * config.Dim);
            fc2 = nn.Linear(4 * config.Dim, config.Dim);
            RegisterComponents();
        }

        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            return fc2.call(nn.functional.gelu(fc1.call(x))).MoveToOuterDisposeScope();
        }
    }
}
