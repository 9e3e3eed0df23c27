using LoRAHub.Torch.NN;
using LoRAHub.Torch.Optim;

namespace LoRAHub.Training.Tests;

using F = torch.nn.functional;

/// <summary>A bigram-style language model small enough for fast trainer tests: embedding → dropout → MLP → head.</summary>
public sealed class TinyLanguageModel : Module, ICausalLanguageModel
{
    public TinyLanguageModel(int vocab, int hidden = 16, double dropout = 0.1, long seed = 0) : base("TinyLanguageModel")
    {
        torch.manual_seed(seed);
        register_module("embed", new Embedding(vocab, hidden));
        register_module("drop", new Dropout(dropout));
        register_module("proj", new Linear(hidden, hidden));
        register_module("lm_head", new Linear(hidden, vocab));
    }

    /// <summary>Test hook: replaces the loss (e.g. with NaN) at given calls.</summary>
    public Func<Tensor, Tensor>? LossOverride { get; set; }

    public Module Root => this;
    public Device Device => named_parameters().First().parameter.device;
    public ScalarType DType => ScalarType.Float32;
    public string ModelType => "tiny";
    public string NameOrPath => "tiny";
    public IReadOnlyList<string> OutputModuleNames => ["lm_head"];
    public AttentionFunction Attention { get; set; } = (q, k, v, m) => F.scaled_dot_product_attention(q, k, v, is_causal: true);
    public bool GradientCheckpointing { get; set; }

    public Tensor Forward(Tensor inputIds, Tensor? attentionMask = null)
    {
        var h = Child<Module>("embed").forward(inputIds);
        h = Child<Module>("drop").forward(h);
        h = Child<Module>("proj").forward(h).silu();
        return Child<Module>("lm_head").forward(h);
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
public sealed class FullFineTune(Module model) : IAdapter, IAdapterMethod
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
        [new ParamGroup(model.parameters().Where(p => p.requires_grad), learningRate, weightDecay)];

    public IReadOnlyDictionary<string, Tensor> StateDict() => model.state_dict();

    public void Save(string directory)
    {
        Directory.CreateDirectory(directory);
        torch.save_safetensors(model.state_dict(), Path.Combine(directory, "model.safetensors"));
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
