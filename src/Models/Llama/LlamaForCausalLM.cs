using LoRAHub.Abstractions;
using LoRAHub.Torch;
using LoRAHub.Torch.NN;

namespace LoRAHub.Models.Llama;

using F = torch.nn.functional;

// The Llama family in one file (Llama 2/3, TinyLlama, Mistral, Qwen2). Module names match transformers, so
// checkpoints load as they are and adapter keys match PEFT's. Submodules are looked up by name at forward time,
// which lets a method plugin replace any Linear with its own layer.

/// <summary>Self-attention with rotary embeddings and grouped-query attention.</summary>
public sealed class LlamaAttention : Module
{
    private readonly LlamaConfig config;

    public LlamaAttention(LlamaConfig config, ScalarType dtype, Device device) : base("LlamaAttention")
    {
        this.config = config;
        int h = config.HiddenSize, d = config.HeadDim;
        register_module("q_proj", new Linear(h, config.NumAttentionHeads * d, config.QkvBias, dtype, device));
        register_module("k_proj", new Linear(h, config.KeyValueHeads * d, config.QkvBias, dtype, device));
        register_module("v_proj", new Linear(h, config.KeyValueHeads * d, config.QkvBias, dtype, device));
        register_module("o_proj", new Linear(config.NumAttentionHeads * d, h, config.OutputBias, dtype, device));
    }

    public Tensor forward(Tensor x, Tensor cos, Tensor sin, AttentionFunction attention, Tensor? paddingMask, KvCache? cache, int layer)
    {
        using var scope = torch.NewDisposeScope();
        long b = x.size(0), t = x.size(1);
        int heads = config.NumAttentionHeads, kvHeads = config.KeyValueHeads, d = config.HeadDim;
        var q = Child<Module>("q_proj").forward(x).view(b, t, heads, d).transpose(1, 2);
        var k = Child<Module>("k_proj").forward(x).view(b, t, kvHeads, d).transpose(1, 2);
        var v = Child<Module>("v_proj").forward(x).view(b, t, kvHeads, d).transpose(1, 2);
        q = RotaryEmbedding.Apply(q, cos, sin);
        k = RotaryEmbedding.Apply(k, cos, sin);
        if (cache != null) (k, v) = cache.Append(layer, k, v);
        // The default attention takes k/v with fewer heads as they are (SDPA's enable_gqa, no copy); a custom one gets
        // them expanded to the query's head count.
        if (kvHeads != heads && !(F.Fused.Gqa && LlamaForCausalLM.IsDefaultAttention(attention)))
        {
            // Grouped-query attention: each kv head serves heads/kvHeads query heads.
            var groups = heads / kvHeads;
            long s = k.size(2);
            k = k.unsqueeze(2).expand(b, kvHeads, groups, s, d).reshape(b, heads, s, d);
            v = v.unsqueeze(2).expand(b, kvHeads, groups, s, d).reshape(b, heads, s, d);
        }
        var y = attention(q, k, v, paddingMask).transpose(1, 2).reshape(b, t, heads * d);
        return Child<Module>("o_proj").forward(y).MoveToOuterDisposeScope();
    }
}

/// <summary>SwiGLU feed-forward: down(silu(gate(x)) · up(x)).</summary>
public sealed class LlamaMLP : Module
{
    public LlamaMLP(LlamaConfig config, ScalarType dtype, Device device) : base("LlamaMLP")
    {
        register_module("gate_proj", new Linear(config.HiddenSize, config.IntermediateSize, config.MlpBias, dtype, device));
        register_module("up_proj", new Linear(config.HiddenSize, config.IntermediateSize, config.MlpBias, dtype, device));
        register_module("down_proj", new Linear(config.IntermediateSize, config.HiddenSize, config.MlpBias, dtype, device));
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = torch.NewDisposeScope();
        var h = F.swiglu(Child<Module>("gate_proj").forward(x), Child<Module>("up_proj").forward(x));
        return Child<Module>("down_proj").forward(h).MoveToOuterDisposeScope();
    }
}

/// <summary>Pre-norm block: x + attn(norm(x)), then + mlp(norm(·)).</summary>
public sealed class LlamaDecoderLayer : Module
{
    public LlamaDecoderLayer(LlamaConfig config, ScalarType dtype, Device device) : base("LlamaDecoderLayer")
    {
        register_module("self_attn", new LlamaAttention(config, dtype, device));
        register_module("mlp", new LlamaMLP(config, dtype, device));
        register_module("input_layernorm", new RMSNorm(config.HiddenSize, config.RmsNormEps, dtype, device));
        register_module("post_attention_layernorm", new RMSNorm(config.HiddenSize, config.RmsNormEps, dtype, device));
    }

    public Tensor forward(Tensor x, Tensor cos, Tensor sin, AttentionFunction attention, Tensor? paddingMask, KvCache? cache, int layer)
    {
        using var scope = torch.NewDisposeScope();
        var h = x + Child<LlamaAttention>("self_attn").forward(Child<Module>("input_layernorm").forward(x), cos, sin, attention, paddingMask, cache, layer);
        var output = h + Child<Module>("mlp").forward(Child<Module>("post_attention_layernorm").forward(h));
        return output.MoveToOuterDisposeScope();
    }
}

/// <summary>The decoder stack: embeddings, layers, final norm (transformers' LlamaModel, named "model").</summary>
public sealed class LlamaModel : Module
{
    public LlamaModel(LlamaConfig config, ScalarType dtype, Device device) : base("LlamaModel")
    {
        register_module("embed_tokens", new Embedding(config.VocabSize, config.HiddenSize, dtype, device));
        var layers = new ModuleList();
        for (var i = 0; i < config.NumHiddenLayers; i++) layers.append(new LlamaDecoderLayer(config, dtype, device));
        register_module("layers", layers);
        register_module("norm", new RMSNorm(config.HiddenSize, config.RmsNormEps, dtype, device));
    }

    public Embedding embed_tokens => Child<Embedding>("embed_tokens");
    public ModuleList layers => Child<ModuleList>("layers");
    public Module norm => Child<Module>("norm");
}

/// <summary>Llama with a language-model head: logits, chunked training loss, and the adapter hooks.</summary>
public sealed class LlamaForCausalLM : Module, ICausalLM
{
    private Tensor? ropeCos, ropeSin;

    public LlamaForCausalLM(LlamaConfig config, ScalarType dtype = ScalarType.Float32, Device? device = null, string nameOrPath = "")
        : base("LlamaForCausalLM")
    {
        config.Validate();
        Config = config;
        DType = dtype;
        NameOrPath = nameOrPath;
        var dev = device ?? Device.CPU;
        register_module("model", new LlamaModel(config, dtype, dev));
        if (!config.TieWordEmbeddings) register_module("lm_head", new Linear(config.HiddenSize, config.VocabSize, false, dtype, dev));
        Attention = DefaultAttention;
    }

    public LlamaConfig Config { get; }
    public LlamaModel model => Child<LlamaModel>("model");

    /// <summary>The output projection's weight (the embedding's when tied).</summary>
    public Tensor LmHeadWeight => Config.TieWordEmbeddings ? model.embed_tokens.weight : ((Linear)Child<Module>("lm_head")).weight;

    public Module Root => this;
    public Device Device => model.embed_tokens.weight.device;
    public ScalarType DType { get; }
    public string ModelType => Config.ModelType;
    public string NameOrPath { get; set; }
    public IReadOnlyList<string> OutputModuleNames => Config.TieWordEmbeddings ? [] : ["lm_head"];
    public AttentionFunction Attention { get; set; }
    public bool GradientCheckpointing { get; set; }

    private static readonly AttentionFunction DefaultAttentionFunction = DefaultAttention;

    /// <summary>True when <paramref name="attention"/> is <see cref="DefaultAttention"/> (which accepts fewer k/v heads).</summary>
    public static bool IsDefaultAttention(AttentionFunction attention) => DefaultAttentionFunction.Equals(attention);

    /// <summary>
    /// Fused causal SDPA; with padding, an explicit causal + key-padding mask. k/v may have fewer heads than q (grouped-query
    /// attention: SDPA's enable_gqa, so the flash kernel reads each kv head for its whole group without a copy).
    /// </summary>
    public static Tensor DefaultAttention(Tensor q, Tensor k, Tensor v, Tensor? paddingMask)
    {
        long t = q.size(2), s = k.size(2);
        var gqa = q.size(1) != k.size(1);
        if (paddingMask is null) return F.scaled_dot_product_attention(q, k, v, is_causal: t == s, enable_gqa: gqa);
        using var scope = torch.NewDisposeScope();
        // Query i (at absolute position s − t + i) sees keys up to its own position that are real tokens.
        var causal = torch.ones([t, s], ScalarType.Bool, q.device).tril(s - t);
        var keys = paddingMask.to(ScalarType.Bool).view(paddingMask.size(0), 1, 1, s);
        var mask = causal.view(1, 1, t, s).logical_and(keys);
        // Padding queries have no visible key and would give NaN; let each see itself (the diagonal at offset s − t).
        var self = causal.triu(s - t).view(1, 1, t, s);
        var safe = mask.logical_or(self.logical_and(keys.logical_not()));
        return F.scaled_dot_product_attention(q, k, v, safe, enable_gqa: gqa).MoveToOuterDisposeScope();
    }

    private (Tensor cos, Tensor sin) Rope(long start, long length, Device device)
    {
        var needed = start + length;
        if (ropeCos is null || ropeCos.size(0) < needed || ropeCos.device != device)
        {
            ropeCos?.Dispose();
            ropeSin?.Dispose();
            var size = (int)Math.Max(needed, Math.Min(Config.MaxPositionEmbeddings, 4096));
            var (c, s) = RotaryEmbedding.Tables(Config, size, device);
            ropeCos = c.DetachFromDisposeScope();
            ropeSin = s.DetachFromDisposeScope();
        }
        return (ropeCos.narrow(0, start, length), ropeSin!.narrow(0, start, length));
    }

    /// <summary>Final hidden states (batch, seq, hidden).</summary>
    public Tensor HiddenStates(Tensor inputIds, Tensor? attentionMask = null, KvCache? cache = null)
    {
        using var scope = torch.NewDisposeScope();
        var start = cache?.Length ?? 0;
        var (cos, sin) = Rope(start, inputIds.size(1), inputIds.device);
        // A mask of all ones changes nothing: drop it so the fused causal kernel is used.
        var mask = attentionMask is not null && attentionMask.eq(0).any().item<bool>() ? attentionMask : null;
        var h = model.embed_tokens.forward(inputIds);
        var layers = model.layers;
        for (var i = 0; i < layers.Count; i++)
        {
            var layer = (LlamaDecoderLayer)layers[i];
            var next = GradientCheckpointing && torch.is_grad_enabled() && cache is null
                ? torch.utils.checkpoint(x => CheckpointedLayer(layer, x, mask), h)
                : layer.forward(h, cos, sin, Attention, mask, cache, i);
            h.Dispose();
            h = next;
        }
        return model.norm.forward(h).MoveToOuterDisposeScope();
    }

    // Runs again in backward, after HiddenStates' scope has freed its cos/sin views: take fresh ones from the table.
    // The caller's attention mask must stay alive until backward (the trainer's batch does).
    private Tensor CheckpointedLayer(LlamaDecoderLayer layer, Tensor x, Tensor? mask)
    {
        var (cos, sin) = Rope(0, x.size(1), x.device);
        return layer.forward(x, cos, sin, Attention, mask, null, 0);
    }

    public Tensor Forward(Tensor inputIds, Tensor? attentionMask = null) => Forward(inputIds, attentionMask, null);

    public Tensor forward(Tensor inputIds, Tensor? attentionMask = null, KvCache? cache = null) => Forward(inputIds, attentionMask, cache);

    public int LayerCount => Config.NumHiddenLayers;
    public int VocabSize => Config.VocabSize;

    public string ConfigJson()
    {
        Config.TorchDType = DType.ToTorchName();
        return Config.ToJson();
    }

    // Old checkpoints stored the rotary inverse frequencies; tied ones may still carry lm_head.weight.
    public bool IsIgnorableCheckpointKey(string key) =>
        key.EndsWith("rotary_emb.inv_freq", StringComparison.Ordinal) || (key == "lm_head.weight" && Config.TieWordEmbeddings);

    public Tensor Forward(Tensor inputIds, Tensor? attentionMask, KvCache? cache)
    {
        using var scope = torch.NewDisposeScope();
        var h = HiddenStates(inputIds, attentionMask, cache);
        // Through the module, so a plugin that replaces lm_head is honoured.
        var logits = Config.TieWordEmbeddings ? F.linear(h, LmHeadWeight) : Child<Module>("lm_head").forward(h);
        return logits.MoveToOuterDisposeScope();
    }

    /// <summary>Next-token loss: labels shifted left by one, -100 ignored, logits made 1024 rows at a time.</summary>
    public Tensor ComputeLoss(Tensor inputIds, Tensor labels, Tensor? attentionMask = null)
    {
        using var scope = torch.NewDisposeScope();
        var h = HiddenStates(inputIds, attentionMask);
        long t = inputIds.size(1);
        var hidden = h.narrow(1, 0, t - 1).reshape(-1, Config.HiddenSize);
        var targets = labels.narrow(1, 1, t - 1).reshape(-1);
        if (!Config.TieWordEmbeddings && Child<Module>("lm_head") is not Linear)
        {
            // A replaced head has no single weight to chunk over: take its logits (fp32) whole.
            var logits = Child<Module>("lm_head").forward(hidden).to(ScalarType.Float32);
            return F.cross_entropy(logits, targets).MoveToOuterDisposeScope();
        }
        return F.chunked_cross_entropy(hidden, LmHeadWeight, targets, 1024).MoveToOuterDisposeScope();
    }

    /// <summary>A randomly initialised model (std 0.02 as transformers' initializer_range), for tests and benchmarks.</summary>
    public static LlamaForCausalLM CreateRandom(LlamaConfig config, ScalarType dtype = ScalarType.Float32, Device? device = null, long seed = 0)
    {
        torch.manual_seed(seed);
        var m = new LlamaForCausalLM(config, dtype, device);
        using var _ = torch.no_grad();
        foreach (var (name, p) in m.named_parameters())
        {
            if (name.EndsWith("norm.weight")) continue;
            if (name.EndsWith(".bias")) p.zero_();
            else p.normal_(0, 0.02);
        }
        return m;
    }

    public override void Dispose()
    {
        ropeCos?.Dispose();
        ropeSin?.Dispose();
        base.Dispose();
    }
}
