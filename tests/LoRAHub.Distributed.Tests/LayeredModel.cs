namespace LoRAHub.Distributed.Tests;

using LoRAHub.Models.Llama;
using F = TorchSharp.torch.nn.functional;

/// <summary>The models of the overlap tests: <see cref="LayeredModel"/>'s variants, and tiny random Llamas (fp32).</summary>
public static class OverlapModels
{
    /// <summary>
    /// "layered", "checkpointed", "misreported" (<see cref="LayeredModel"/>); "llama" (tied embeddings, gradient
    /// checkpointing: the head stage is the final norm, the embedding reduced after backward) or "llama-untied".
    /// </summary>
    public static ICausalLanguageModel Create(string variant, Device? device = null)
    {
        if (!variant.StartsWith("llama")) return new LayeredModel(variant);
        var tied = variant == "llama";
        var config = new LlamaConfig
        {
            HiddenSize = 32, IntermediateSize = 64, NumHiddenLayers = 2, NumAttentionHeads = 4, NumKeyValueHeads = 2,
            VocabSize = 32, TieWordEmbeddings = tied, MaxPositionEmbeddings = 64,
        };
        var model = LlamaForCausalLM.CreateRandom(config, ScalarType.Float32, device ?? CPU, seed: 0);
        model.GradientCheckpointing = tied;
        return model;
    }
}

/// <summary>
/// A tiny layered LM with data-parallel sync points (<see cref="ILayerInputHook"/>): embedding → 3 residual blocks →
/// head. Variants: "checkpointed" recomputes each block in backward (the hook stays outside the checkpoint);
/// "misreported" also uses block 2's weight inside block 0 while reporting it as block 2's only, so its gradient is
/// not complete when block 2's sync point runs (the overlap must notice and wait).
/// </summary>
public sealed class LayeredModel : nn.Module<Tensor, Tensor>, ICausalLanguageModel, ILayerInputHook
{
    private readonly nn.Module<Tensor, Tensor> embed;
    private readonly TorchSharp.Modules.ModuleList<Block> blocks;
    private readonly nn.Module<Tensor, Tensor> lm_head;
    private readonly bool misreported;

    public sealed class Block : nn.Module<Tensor, Tensor>
    {
        public readonly TorchSharp.Modules.Linear proj;

        public Block(int hidden) : base("Block")
        {
            proj = nn.Linear(hidden, hidden);
            RegisterComponents();
        }

        public override Tensor forward(Tensor x) => x + F.silu(proj.forward(x));
    }

    public LayeredModel(string variant, int vocab = 32, int hidden = 16) : base("LayeredModel")
    {
        if (variant is not ("layered" or "checkpointed" or "misreported")) throw new ArgumentException($"unknown variant {variant}");
        VocabSize = vocab;
        misreported = variant == "misreported";
        GradientCheckpointing = variant == "checkpointed";
        torchx.manual_seed(0);
        embed = nn.Embedding(vocab, hidden);
        blocks = new TorchSharp.Modules.ModuleList<Block>(new Block(hidden), new Block(hidden), new Block(hidden));
        lm_head = nn.Linear(hidden, vocab);
        RegisterComponents();
    }

    public nn.Module Root => this;
    public Device Device => parameters().First().device;
    public ScalarType DType => ScalarType.Float32;
    public string ModelType => "layered";
    public string NameOrPath => "layered";
    public IReadOnlyList<string> OutputModuleNames => ["lm_head"];
    public AttentionFunction Attention { get; set; } = (q, k, v, m) => F.scaled_dot_product_attention(q, k, v, is_casual: true);
    public bool GradientCheckpointing { get; set; }
    public int LayerCount => blocks.Count;
    public int VocabSize { get; }

    public IReadOnlyList<IReadOnlyList<nn.Module>> HookedLayers => [.. blocks.Select(b => (IReadOnlyList<nn.Module>)[b]), [lm_head]];
    public Func<int, Tensor, Tensor>? LayerInputHook { get; set; }

    private Tensor Hook(int i, Tensor h) => LayerInputHook is { } hook && is_grad_enabled() && h.requires_grad ? hook(i, h) : h;

    public override Tensor forward(Tensor inputIds) => Forward(inputIds);

    public Tensor Forward(Tensor inputIds, Tensor? attentionMask = null)
    {
        using var scope = torch.NewDisposeScope();
        var h = embed.forward(inputIds);
        for (var i = 0; i < blocks.Count; i++)
        {
            h = Hook(i, h);
            var block = blocks[i];
            var next = GradientCheckpointing && is_grad_enabled() ? torchx.utils.checkpoint(x => block.forward(x), h) : block.forward(h);
            if (misreported && i == 0) next = next + 0.1 * blocks[2].proj.forward(h);
            h = next;
        }
        h = Hook(blocks.Count, h);
        return lm_head.forward(h).MoveToOuterDisposeScope();
    }

    public Tensor ComputeLoss(Tensor inputIds, Tensor labels, Tensor? attentionMask = null)
    {
        using var scope = torch.NewDisposeScope();
        var logits = Forward(inputIds, attentionMask);
        var t = inputIds.size(1);
        var shiftedLogits = logits[.., ..(int)(t - 1)].reshape(-1, logits.size(-1));
        var shiftedLabels = labels[.., 1..].reshape(-1);
        return F.cross_entropy(shiftedLogits, shiftedLabels).MoveToOuterDisposeScope();
    }
}
