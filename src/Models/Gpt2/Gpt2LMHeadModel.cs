using LoRAHub.Abstractions;
using LoRAHub.Models.Llama;
using LoRAHub.Torch;
using LoRAHub.Torch.NN;

namespace LoRAHub.Models.Gpt2;

using F = torch.nn.functional;

// GPT-2 with transformers' module names (transformer.wte, transformer.h.N.attn.c_attn, ...): learned positions,
// pre-LayerNorm blocks, fused qkv projection in Conv1D layout, tanh-approximated GELU, lm_head tied to wte.

/// <summary>Multi-head causal self-attention with one fused c_attn projection.</summary>
public sealed class Gpt2Attention : Module
{
    private readonly int heads;

    public Gpt2Attention(Gpt2Config config, ScalarType dtype, Device device) : base("GPT2Attention")
    {
        heads = config.NHead;
        register_module("c_attn", new Conv1D(config.NEmbd, 3 * config.NEmbd, dtype, device));
        register_module("c_proj", new Conv1D(config.NEmbd, config.NEmbd, dtype, device));
    }

    public Tensor forward(Tensor x, AttentionFunction attention, Tensor? paddingMask, KvCache? cache, int layer)
    {
        using var scope = torch.NewDisposeScope();
        long b = x.size(0), t = x.size(1), c = x.size(2), d = c / heads;
        var qkv = Child<Module>("c_attn").forward(x).split(c, 2);
        Tensor Heads(Tensor y) => y.view(b, t, heads, d).transpose(1, 2);
        Tensor q = Heads(qkv[0]), k = Heads(qkv[1]), v = Heads(qkv[2]);
        if (cache != null) (k, v) = cache.Append(layer, k, v);
        var y = attention(q, k, v, paddingMask).transpose(1, 2).reshape(b, t, c);
        return Child<Module>("c_proj").forward(y).MoveToOuterDisposeScope();
    }
}

/// <summary>c_proj(gelu_tanh(c_fc(x))).</summary>
public sealed class Gpt2MLP : Module
{
    private readonly string approximate;

    public Gpt2MLP(Gpt2Config config, ScalarType dtype, Device device) : base("GPT2MLP")
    {
        approximate = config.ActivationFunction == "gelu" ? "none" : "tanh";
        register_module("c_fc", new Conv1D(config.NEmbd, config.Inner, dtype, device));
        register_module("c_proj", new Conv1D(config.Inner, config.NEmbd, dtype, device));
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = torch.NewDisposeScope();
        var h = Child<Module>("c_fc").forward(x).gelu(approximate);
        return Child<Module>("c_proj").forward(h).MoveToOuterDisposeScope();
    }
}

/// <summary>x + attn(ln_1(x)), then + mlp(ln_2(·)).</summary>
public sealed class Gpt2Block : Module
{
    public Gpt2Block(Gpt2Config config, ScalarType dtype, Device device) : base("GPT2Block")
    {
        register_module("ln_1", new LayerNorm(config.NEmbd, config.LayerNormEpsilon, true, dtype, device));
        register_module("attn", new Gpt2Attention(config, dtype, device));
        register_module("ln_2", new LayerNorm(config.NEmbd, config.LayerNormEpsilon, true, dtype, device));
        register_module("mlp", new Gpt2MLP(config, dtype, device));
    }

    public Tensor forward(Tensor x, AttentionFunction attention, Tensor? paddingMask, KvCache? cache, int layer)
    {
        using var scope = torch.NewDisposeScope();
        var h = x + Child<Gpt2Attention>("attn").forward(Child<Module>("ln_1").forward(x), attention, paddingMask, cache, layer);
        return (h + Child<Module>("mlp").forward(Child<Module>("ln_2").forward(h))).MoveToOuterDisposeScope();
    }
}

/// <summary>transformers' GPT2Model, registered as "transformer".</summary>
public sealed class Gpt2Model : Module
{
    public Gpt2Model(Gpt2Config config, ScalarType dtype, Device device) : base("GPT2Model")
    {
        register_module("wte", new Embedding(config.VocabSize, config.NEmbd, dtype, device));
        register_module("wpe", new Embedding(config.NPositions, config.NEmbd, dtype, device));
        var h = new ModuleList();
        for (var i = 0; i < config.NLayer; i++) h.append(new Gpt2Block(config, dtype, device));
        register_module("h", h);
        register_module("ln_f", new LayerNorm(config.NEmbd, config.LayerNormEpsilon, true, dtype, device));
    }

    public Embedding wte => Child<Embedding>("wte");
    public Embedding wpe => Child<Embedding>("wpe");
    public ModuleList h => Child<ModuleList>("h");
    public Module ln_f => Child<Module>("ln_f");
}

/// <summary>GPT-2 with its tied language-model head.</summary>
public sealed class Gpt2LMHeadModel : Module, ICausalLM
{
    public Gpt2LMHeadModel(Gpt2Config config, ScalarType dtype = ScalarType.Float32, Device? device = null, string nameOrPath = "") : base("GPT2LMHeadModel")
    {
        Config = config;
        DType = dtype;
        NameOrPath = nameOrPath;
        register_module("transformer", new Gpt2Model(config, dtype, device ?? Device.CPU));
        Attention = LlamaForCausalLM.DefaultAttention;
    }

    public Gpt2Config Config { get; }
    public Gpt2Model transformer => Child<Gpt2Model>("transformer");
    public Module Root => this;
    public Device Device => transformer.wte.weight.device;
    public ScalarType DType { get; }
    public string ModelType => "gpt2";
    public string NameOrPath { get; set; }
    public IReadOnlyList<string> OutputModuleNames => [];
    public AttentionFunction Attention { get; set; }
    /// <summary>Not implemented for GPT-2 (ignored).</summary>
    public bool GradientCheckpointing { get; set; }
    public int LayerCount => Config.NLayer;
    public int VocabSize => Config.VocabSize;

    public string ConfigJson()
    {
        Config.TorchDType = DType.ToTorchName();
        return Config.ToJson();
    }

    // transformers < 4.40 saved the causal-mask buffers; tied checkpoints may carry lm_head.weight.
    public bool IsIgnorableCheckpointKey(string key) =>
        key == "lm_head.weight" || key.EndsWith(".attn.bias", StringComparison.Ordinal) || key.EndsWith(".attn.masked_bias", StringComparison.Ordinal);

    public Tensor HiddenStates(Tensor inputIds, Tensor? attentionMask = null, KvCache? cache = null)
    {
        using var scope = torch.NewDisposeScope();
        long t = inputIds.size(1), start = cache?.Length ?? 0;
        var hasPadding = attentionMask is not null && attentionMask.eq(0).any().item<bool>();
        // Learned positions are absolute, so with left padding each row counts from its first real token.
        var positions = hasPadding
            ? (attentionMask!.to(ScalarType.Int64).cumsum(1) - 1L).clamp_min(0).narrow(1, attentionMask.size(1) - t, t).to(ScalarType.Int64)
            : torch.arange(start, start + t, 1, ScalarType.Int64, inputIds.device).unsqueeze(0);
        var mask = hasPadding ? attentionMask : null;
        var h = transformer.wte.forward(inputIds) + transformer.wpe.forward(positions);
        var blocks = transformer.h;
        for (var i = 0; i < blocks.Count; i++)
        {
            var next = ((Gpt2Block)blocks[i]).forward(h, Attention, mask, cache, i);
            h.Dispose();
            h = next;
        }
        return transformer.ln_f.forward(h).MoveToOuterDisposeScope();
    }

    public Tensor Forward(Tensor inputIds, Tensor? attentionMask = null) => forward(inputIds, attentionMask, null);

    public Tensor forward(Tensor inputIds, Tensor? attentionMask = null, KvCache? cache = null)
    {
        using var scope = torch.NewDisposeScope();
        return F.linear(HiddenStates(inputIds, attentionMask, cache), transformer.wte.weight).MoveToOuterDisposeScope();
    }

    public Tensor ComputeLoss(Tensor inputIds, Tensor labels, Tensor? attentionMask = null)
    {
        using var scope = torch.NewDisposeScope();
        var h = HiddenStates(inputIds, attentionMask);
        long t = inputIds.size(1);
        var hidden = h.narrow(1, 0, t - 1).reshape(-1, Config.NEmbd);
        var targets = labels.narrow(1, 1, t - 1).reshape(-1);
        return F.chunked_cross_entropy(hidden, transformer.wte.weight, targets, 1024).MoveToOuterDisposeScope();
    }

    public static Gpt2LMHeadModel CreateRandom(Gpt2Config config, ScalarType dtype = ScalarType.Float32, Device? device = null, long seed = 0)
    {
        torch.manual_seed(seed);
        var m = new Gpt2LMHeadModel(config, dtype, device);
        using var _ = torch.no_grad();
        foreach (var (name, p) in m.named_parameters())
        {
            if (name.Contains(".ln_")) continue;
            if (name.EndsWith(".bias")) p.zero_();
            else p.normal_(0, 0.02);
        }
        return m;
    }
}
