using LoRAHub.Abstractions;
using LoRAHub.Models.Llama;
using LoRAHub.TorchExtensions;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;

namespace LoRAHub.Models.Gpt2;

// GPT-2 with transformers' module names (transformer.wte, transformer.h.N.attn.c_attn, ...): learned positions,
// pre-LayerNorm blocks, fused qkv projection in Conv1D layout, tanh-approximated GELU, lm_head tied to wte. Children an
// adapter may wrap are fields typed Module<Tensor, Tensor>: `replace_submodule` sets the field, and forward reads it.

/// <summary>Multi-head causal self-attention with one fused c_attn projection.</summary>
public sealed class Gpt2Attention : nn.Module
{
    private readonly int heads;
    private Module<Tensor, Tensor> c_attn, c_proj;

    public Gpt2Attention(Gpt2Config config, ScalarType dtype, Device device) : base("GPT2Attention")
    {
        heads = config.NHead;
        c_attn = new Conv1D(config.NEmbd, 3 * config.NEmbd, dtype, device);
        c_proj = new Conv1D(config.NEmbd, config.NEmbd, dtype, device);
        RegisterComponents();
    }

    public Tensor forward(Tensor x, AttentionFunction attention, Tensor? paddingMask, KvCache? cache, int layer)
    {
        using var scope = NewDisposeScope();
        long b = x.size(0), t = x.size(1), c = x.size(2), d = c / heads;
        var qkv = c_attn.call(x).split(c, 2);
        Tensor Heads(Tensor y) => y.view(b, t, heads, d).transpose(1, 2);
        Tensor q = Heads(qkv[0]), k = Heads(qkv[1]), v = Heads(qkv[2]);
        if (cache != null) (k, v) = cache.Append(layer, k, v);
        var y = attention(q, k, v, paddingMask).transpose(1, 2).reshape(b, t, c);
        return c_proj.call(y).MoveToOuterDisposeScope();
    }
}

/// <summary>c_proj(gelu_tanh(c_fc(x))).</summary>
public sealed class Gpt2MLP : Module<Tensor, Tensor>
{
    private readonly TorchSharp.Modules.GELU.Approximate approximate;
    private Module<Tensor, Tensor> c_fc, c_proj;

    public Gpt2MLP(Gpt2Config config, ScalarType dtype, Device device) : base("GPT2MLP")
    {
        approximate = config.ActivationFunction == "gelu" ? TorchSharp.Modules.GELU.Approximate.none : TorchSharp.Modules.GELU.Approximate.tanh;
        c_fc = new Conv1D(config.NEmbd, config.Inner, dtype, device);
        c_proj = new Conv1D(config.Inner, config.NEmbd, dtype, device);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var h = c_fc.call(x).gelu(approximate);
        return c_proj.call(h).MoveToOuterDisposeScope();
    }
}

/// <summary>x + attn(ln_1(x)), then + mlp(ln_2(·)).</summary>
public sealed class Gpt2Block : nn.Module
{
    private Module<Tensor, Tensor> ln_1;
    private readonly Gpt2Attention attn;
    private Module<Tensor, Tensor> ln_2, mlp;

    public Gpt2Block(Gpt2Config config, ScalarType dtype, Device device) : base("GPT2Block")
    {
        ln_1 = LayerNorm(config.NEmbd, config.LayerNormEpsilon, device: device, dtype: dtype);
        attn = new Gpt2Attention(config, dtype, device);
        ln_2 = LayerNorm(config.NEmbd, config.LayerNormEpsilon, device: device, dtype: dtype);
        mlp = new Gpt2MLP(config, dtype, device);
        RegisterComponents();
    }

    public Tensor forward(Tensor x, AttentionFunction attention, Tensor? paddingMask, KvCache? cache, int layer)
    {
        using var scope = NewDisposeScope();
        var h = x + attn.forward(ln_1.call(x), attention, paddingMask, cache, layer);
        return (h + mlp.call(ln_2.call(h))).MoveToOuterDisposeScope();
    }
}

/// <summary>transformers' GPT2Model, registered as "transformer".</summary>
public sealed class Gpt2Model : nn.Module
{
    private Module<Tensor, Tensor> wte, wpe;
    [ComponentName(Name = "h")] private readonly ModuleList<Gpt2Block> _h = new();
    private Module<Tensor, Tensor> ln_f;

    public Gpt2Model(Gpt2Config config, ScalarType dtype, Device device) : base("GPT2Model")
    {
        wte = Embedding(config.VocabSize, config.NEmbd, device: device, dtype: dtype);
        wpe = Embedding(config.NPositions, config.NEmbd, device: device, dtype: dtype);
        for (var i = 0; i < config.NLayer; i++) _h.append(new Gpt2Block(config, dtype, device));
        ln_f = LayerNorm(config.NEmbd, config.LayerNormEpsilon, device: device, dtype: dtype);
        RegisterComponents();
    }

    public ModuleList<Gpt2Block> h => _h;

    /// <summary>The token embedding table (also the tied output projection): wte's registered weight.</summary>
    public Tensor wte_weight => wte.get_parameter("weight")
        ?? throw new InvalidOperationException($"transformer.wte is a {wte.TypeName()} without a 'weight' parameter");

    /// <summary>Token plus learned position embeddings.</summary>
    public Tensor embed(Tensor inputIds, Tensor positions) => wte.call(inputIds) + wpe.call(positions);

    public Tensor final_norm(Tensor x) => ln_f.call(x);
}

/// <summary>
/// GPT-2 with its language-model head: tied to wte (no lm_head module) as GPT-2 ships, or an lm_head Linear of its own
/// when config.json says tie_word_embeddings false (a merged folder whose head was trained as modules_to_save).
/// </summary>
public sealed class Gpt2LMHeadModel : Module<Tensor, Tensor>, ICausalLanguageModel, ITiedOutputHead
{
    [ComponentName(Name = "transformer")] private readonly Gpt2Model _transformer;
    private Module<Tensor, Tensor>? lm_head;

    public Gpt2LMHeadModel(Gpt2Config config, ScalarType dtype = ScalarType.Float32, Device? device = null, string nameOrPath = "") : base("GPT2LMHeadModel")
    {
        Config = config;
        DType = dtype;
        NameOrPath = nameOrPath;
        _transformer = new Gpt2Model(config, dtype, device ?? CPU);
        lm_head = config.TieWordEmbeddings ? null : Linear(config.NEmbd, config.VocabSize, false, device ?? CPU, dtype);
        Attention = LlamaForCausalLM.DefaultAttention;
        RegisterComponents();
        this.DetachParametersFromDisposeScope();
    }

    public Gpt2Config Config { get; }
    public Gpt2Model transformer => _transformer;
    public nn.Module Root => this;
    public Device Device => _transformer.wte_weight.device;
    public ScalarType DType { get; }
    public string ModelType => "gpt2";
    public string NameOrPath { get; set; }
    public IReadOnlyList<string> OutputModuleNames => Config.TieWordEmbeddings ? [] : ["lm_head"];
    public AttentionFunction Attention { get; set; }
    public bool GradientCheckpointing { get; set; }
    public int LayerCount => Config.NLayer;
    public int VocabSize => Config.VocabSize;

    public string ConfigJson()
    {
        Config.TorchDType = DType.ToString().ToLowerInvariant(); // Float32, BFloat16, Float16 -> transformers' float32, bfloat16, float16
        return Config.ToJson();
    }

    // transformers < 4.40 saved the causal-mask buffers; tied checkpoints may carry lm_head.weight.
    public bool IsIgnorableCheckpointKey(string key) =>
        (key == "lm_head.weight" && Config.TieWordEmbeddings) || key.EndsWith(".attn.bias", StringComparison.Ordinal) || key.EndsWith(".attn.masked_bias", StringComparison.Ordinal);

    public Tensor HiddenStates(Tensor inputIds, Tensor? attentionMask = null, KvCache? cache = null)
    {
        using var scope = NewDisposeScope();
        long t = inputIds.size(1), start = cache?.Length ?? 0;
        var hasPadding = attentionMask is not null && attentionMask.eq(0).any().item<bool>();
        // Learned positions are absolute, so with left padding each row counts from its first real token.
        var positions = hasPadding
            ? (attentionMask!.to(ScalarType.Int64).cumsum(1) - 1L).clamp_min(0).narrow(1, attentionMask.size(1) - t, t).to(ScalarType.Int64)
            : arange(start, start + t, 1, ScalarType.Int64, inputIds.device).unsqueeze(0);
        var mask = hasPadding ? attentionMask : null;
        var h = _transformer.embed(inputIds, positions);
        var blocks = _transformer.h;
        for (var i = 0; i < blocks.Count; i++)
        {
            var block = blocks[i];
            var next = GradientCheckpointing && is_grad_enabled() && cache is null
                ? torchx.utils.checkpoint(x => block.forward(x, Attention, mask, null, 0), h)
                : block.forward(h, Attention, mask, cache, i);
            h.Dispose();
            h = next;
        }
        return _transformer.final_norm(h).MoveToOuterDisposeScope();
    }

    /// <summary>Logits (batch, seq, vocab).</summary>
    public override Tensor forward(Tensor input_ids) => Forward(input_ids, null, null);

    public Tensor Forward(Tensor inputIds, Tensor? attentionMask = null) => Forward(inputIds, attentionMask, null);

    /// <summary>Logits; with a cache, <paramref name="inputIds"/> are the new positions only and the mask covers all.</summary>
    public Tensor Forward(Tensor inputIds, Tensor? attentionMask, KvCache? cache)
    {
        using var scope = NewDisposeScope();
        var h = HiddenStates(inputIds, attentionMask, cache);
        // Through the module when there is one, so a method that replaces lm_head is honoured.
        return (lm_head is null ? nn.functional.linear(h, _transformer.wte_weight) : lm_head.call(h)).MoveToOuterDisposeScope();
    }

    public Tensor ComputeLoss(Tensor inputIds, Tensor labels, Tensor? attentionMask = null)
    {
        using var scope = NewDisposeScope();
        var h = HiddenStates(inputIds, attentionMask);
        long t = inputIds.size(1);
        var hidden = h.narrow(1, 0, t - 1).reshape(-1, Config.NEmbd);
        var targets = labels.narrow(1, 1, t - 1).reshape(-1);
        if (lm_head is not null and not TorchSharp.Modules.Linear)
        {
            // A replaced head has no single weight to chunk over: take its logits whole (fp32).
            var logits = lm_head.call(hidden).to(ScalarType.Float32);
            return nn.functional.cross_entropy(logits, targets).MoveToOuterDisposeScope();
        }
        var weight = (lm_head as TorchSharp.Modules.Linear)?.weight ?? _transformer.wte_weight;
        return torchx.nn.functional.chunked_cross_entropy(hidden, weight, targets, torchx.nn.functional.CrossEntropyChunk).MoveToOuterDisposeScope();
    }

    public string InputEmbeddingsPath => "transformer.wte";

    public string OutputHeadPath => "lm_head";

    public bool OutputHeadTied => Config.TieWordEmbeddings;

    public void UntieOutputHead()
    {
        if (!Config.TieWordEmbeddings) return;
        lm_head = TiedOutputHead.Create(this, _transformer.wte_weight, InputEmbeddingsPath);
        Config.TieWordEmbeddings = false;
    }

    public bool TryRetieOutputHead()
    {
        if (Config.TieWordEmbeddings) return true;
        if (!TiedOutputHead.TryRemove(this, lm_head, _transformer.wte_weight)) return false;
        lm_head = null;
        Config.TieWordEmbeddings = true;
        return true;
    }

    public static Gpt2LMHeadModel CreateRandom(Gpt2Config config, ScalarType dtype = ScalarType.Float32, Device? device = null, long seed = 0)
    {
        torchx.manual_seed(seed);
        var m = new Gpt2LMHeadModel(config, dtype, device);
        using var _ = no_grad();
        foreach (var (name, p) in m.named_parameters())
        {
            if (name.Contains(".ln_")) continue;
            if (name.EndsWith(".bias")) p.zero_();
            else p.normal_(0, 0.02);
        }
        return m;
    }
}
