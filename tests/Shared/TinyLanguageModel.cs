using LoRAHub.TorchExtensions.Optim;

namespace LoRAHub.Tests.Shared;

using F = TorchSharp.torch.nn.functional;

/// <summary>A bigram-style language model small enough for fast trainer tests: embedding → dropout → MLP → head.</summary>
public sealed class TinyLanguageModel : nn.Module<Tensor, Tensor>, ICausalLanguageModel
{
    private readonly nn.Module<Tensor, Tensor> embed;
    private readonly nn.Module<Tensor, Tensor> drop;
    private readonly nn.Module<Tensor, Tensor> proj;
    private readonly nn.Module<Tensor, Tensor> lm_head;

    public TinyLanguageModel(int vocab, int hidden = 16, double dropout = 0.1, long seed = 0) : base("TinyLanguageModel")
    {
        VocabSize = vocab;
        torchx.manual_seed(seed);
        embed = nn.Embedding(vocab, hidden);
        drop = nn.Dropout(dropout);
        proj = nn.Linear(hidden, hidden);
        lm_head = nn.Linear(hidden, vocab);
        RegisterComponents();
    }

    /// <summary>Test hook: replaces the loss (e.g. with NaN) at given calls.</summary>
    public Func<Tensor, Tensor>? LossOverride { get; set; }

    public nn.Module Root => this;
    public Device Device => parameters().First().device;
    public ScalarType DType => ScalarType.Float32;
    public string ModelType => "tiny";
    public string NameOrPath => "tiny";
    public IReadOnlyList<string> OutputModuleNames => ["lm_head"];
    public AttentionFunction Attention { get; set; } = (q, k, v, m) => F.scaled_dot_product_attention(q, k, v, is_casual: true);
    public bool GradientCheckpointing { get; set; }
    public int LayerCount => 1;
    public int VocabSize { get; }

    public override Tensor forward(Tensor inputIds) => Forward(inputIds);

    public Tensor Forward(Tensor inputIds, Tensor? attentionMask = null)
    {
        using var scope = torch.NewDisposeScope();
        var h = embed.forward(inputIds);
        h = drop.forward(h);
        h = proj.forward(h).silu();
        return lm_head.forward(h).MoveToOuterDisposeScope();
    }

    public Tensor ComputeLoss(Tensor inputIds, Tensor labels, Tensor? attentionMask = null)
    {
        using var scope = torch.NewDisposeScope();
        var logits = Forward(inputIds, attentionMask);
        var t = inputIds.size(1);
        var shiftedLogits = logits[.., ..(int)(t - 1)].reshape(-1, logits.size(-1));
        var shiftedLabels = labels[.., 1..].reshape(-1);
        var loss = F.cross_entropy(shiftedLogits, shiftedLabels);
        if (LossOverride != null) loss = LossOverride(loss);
        return loss.MoveToOuterDisposeScope();
    }
}

/// <summary>Trains every parameter (full fine-tuning) — the simplest IAdapter, for trainer tests.</summary>
public sealed class FullFineTune(nn.Module model) : IAdapter, IAdapterMethod
{
    public IAdapterMethod Method => this;
    public object Options => new();
    public bool Enabled { get; set; } = true;
    public long ModelParameterCount => model.parameters().Sum(p => p.numel());
    public string Name => "full";
    public string Description => "all parameters";
    public Type OptionsType => typeof(object);
    public object CreateDefaultOptions() => new();
    public IAdapter Attach(IAdaptableModel m, object options) => this;
    public IAdapter Load(IAdaptableModel m, string directory) => this;

    public IReadOnlyList<ParamGroup> ParameterGroups(double learningRate, double weightDecay) =>
        [new ParamGroup(model.parameters().Where(p => p.requires_grad).Select(p => (Tensor)p), learningRate, weightDecay)];

    public IReadOnlyDictionary<string, Tensor> StateDict() => model.state_dict();

    public void Save(string directory)
    {
        Directory.CreateDirectory(directory);
        torchx.save_safetensors(model.state_dict(), Path.Combine(directory, "model.safetensors"));
    }

    public void Dispose() { }
}

/// <summary>One token per character over a fixed alphabet; id 0 pads, 1 is end-of-sequence.</summary>
public sealed class CharTokenizer(string alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 +=:\n#.") : ITokenizer
{
    public int[] Encode(string text, bool addSpecialTokens = true) =>
        text.Select(c => alphabet.IndexOf(c) is var i and >= 0 ? i + 2 : throw new FormatException($"character '{c}' is not in the alphabet")).ToArray();

    public string Decode(IEnumerable<int> ids, bool skipSpecialTokens = true) =>
        new(ids.Where(i => i >= 2).Select(i => alphabet[i - 2]).ToArray());

    public int? BosTokenId => null;
    public int? EosTokenId => 1;
    public int PadTokenId => 0;
    public int VocabSize => alphabet.Length + 2;

    public string ApplyChatTemplate(IReadOnlyList<(string Role, string Content)> messages, bool addGenerationPrompt) =>
        string.Concat(messages.Select(m => $"#{m.Role[0]}:{m.Content}\n")) + (addGenerationPrompt ? "#a:" : "");
}
