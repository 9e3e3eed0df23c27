using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;

namespace LoRAHub.Models.Llama;

// The Llama family in one file (Llama 2/3, TinyLlama, Mistral, Qwen2), as TorchSharp modules. Field names are
// transformers' module names, so state_dict keys are transformers' keys and adapter keys match PEFT's. Children an
// adapter may wrap are fields typed Module<Tensor, Tensor>: `replace_submodule` sets the field, and forward reads it.

/// <summary>
/// Self-attention with rotary embeddings and grouped-query attention; per family also separate or fused (Phi-3 qkv_proj)
/// projections, q/k norms per head (Qwen3, Gemma 3), a sliding window, Gemma's score scale and soft-capping.
/// </summary>
public sealed class LlamaAttention : nn.Module
{
    private readonly int heads, kvHeads, headDim;
    private readonly int? window;
    private readonly double? softcap;
    private readonly double scale;
    private Module<Tensor, Tensor>? q_proj, k_proj, v_proj, qkv_proj;
    private Module<Tensor, Tensor> o_proj;
    private Module<Tensor, Tensor>? q_norm, k_norm;

    public LlamaAttention(LlamaConfig config, int layer, ScalarType dtype, Device device) : base(nameof(LlamaAttention))
    {
        (heads, kvHeads, headDim) = (config.NumAttentionHeads, config.KeyValueHeads, config.HeadDim);
        (window, softcap, scale) = (config.WindowOf(layer), config.AttnLogitSoftcapping, config.AttentionScale);
        int h = config.HiddenSize;
        if (config.Family.FusedProjections)
            qkv_proj = Linear(h, (heads + 2 * kvHeads) * headDim, config.QkvBias, device, dtype);
        else
        {
            q_proj = Linear(h, heads * headDim, config.QkvBias, device, dtype);
            k_proj = Linear(h, kvHeads * headDim, config.QkvBias, device, dtype);
            v_proj = Linear(h, kvHeads * headDim, config.QkvBias, device, dtype);
        }
        o_proj = Linear(heads * headDim, h, config.OutputBias, device, dtype);
        if (config.Family.QkNorm)
        {
            q_norm = GemmaRMSNorm.For(config, headDim, dtype, device);
            k_norm = GemmaRMSNorm.For(config, headDim, dtype, device);
        }
        RegisterComponents();
    }

    /// <summary>The attention window of this layer (null: full causal attention).</summary>
    public int? sliding_window => window;

    public Tensor forward(Tensor x, Tensor cos, Tensor sin, AttentionFunction attention, Tensor? paddingMask, KvCache? cache, int layer)
    {
        using var scope = NewDisposeScope();
        long b = x.size(0), t = x.size(1);
        Tensor q, k, v;
        if (qkv_proj is not null)
        {
            var qkv = qkv_proj.call(x);
            q = qkv.narrow(-1, 0, heads * headDim);
            k = qkv.narrow(-1, heads * headDim, kvHeads * headDim);
            v = qkv.narrow(-1, (heads + kvHeads) * headDim, kvHeads * headDim);
        }
        else (q, k, v) = (q_proj!.call(x), k_proj!.call(x), v_proj!.call(x));
        q = q.view(b, t, heads, headDim);
        k = k.view(b, t, kvHeads, headDim);
        if (q_norm is not null) (q, k) = (q_norm.call(q), k_norm!.call(k));
        q = q.transpose(1, 2);
        k = k.transpose(1, 2);
        v = v.view(b, t, kvHeads, headDim).transpose(1, 2);
        q = RotaryEmbedding.Apply(q, cos, sin);
        k = RotaryEmbedding.Apply(k, cos, sin);
        if (cache != null) (k, v) = cache.Append(layer, k, v);
        long s = k.size(2);
        Tensor y;
        if ((window is int w && s > w) || softcap is not null)
        {
            // The window hides keys (or the scores are capped): an explicit mask, which a replaced attention cannot take.
            if (!LlamaForCausalLM.IsDefaultAttention(attention))
                throw new NotSupportedException($"this layer uses {(softcap is null ? $"sliding-window attention (window {window}, {s} positions)" : "soft-capped attention scores")}, " +
                    "which a replaced attention function (e.g. LongLoRA's) does not implement; use sequences within the window or the model's own attention");
            y = MaskedAttention.Forward(q, k, v, paddingMask, window, softcap, scale);
        }
        else
        {
            // Attention functions scale by 1/√head_dim; Gemma's 1/√query_pre_attn_scalar is folded into q.
            var defaultScale = 1.0 / Math.Sqrt(headDim);
            if (Math.Abs(scale - defaultScale) > 1e-12 * defaultScale) q = q * (scale / defaultScale);
            // k/v are expanded to the query's head count (one copy; TorchSharp's SDPA has no enable_gqa, and this measured
            // faster than attending per group). With Fused.Gqa on, the default attention takes them as they are instead.
            if (kvHeads != heads && !(torchx.nn.functional.Fused.Gqa && LlamaForCausalLM.IsDefaultAttention(attention)))
            {
                // Grouped-query attention: each kv head serves heads/kvHeads query heads.
                var groups = heads / kvHeads;
                k = k.unsqueeze(2).expand(b, kvHeads, groups, s, headDim).reshape(b, heads, s, headDim);
                v = v.unsqueeze(2).expand(b, kvHeads, groups, s, headDim).reshape(b, heads, s, headDim);
            }
            y = attention(q, k, v, paddingMask);
        }
        y = y.transpose(1, 2).reshape(b, t, heads * headDim);
        return o_proj.call(y).MoveToOuterDisposeScope();
    }
}

/// <summary>Gated feed-forward: down(act(gate(x)) · up(x)), SwiGLU (silu) or Gemma's GeGLU (tanh gelu).</summary>
public sealed class LlamaMLP : Module<Tensor, Tensor>
{
    private readonly string activation;
    private Module<Tensor, Tensor> gate_proj, up_proj, down_proj;

    public LlamaMLP(LlamaConfig config, ScalarType dtype, Device device) : base(nameof(LlamaMLP))
    {
        activation = config.Activation;
        gate_proj = Linear(config.HiddenSize, config.IntermediateSize, config.MlpBias, device, dtype);
        up_proj = Linear(config.HiddenSize, config.IntermediateSize, config.MlpBias, device, dtype);
        down_proj = Linear(config.IntermediateSize, config.HiddenSize, config.MlpBias, device, dtype);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var h = GatedActivation.Apply(activation, gate_proj.call(x), up_proj.call(x));
        return down_proj.call(h).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// Pre-norm block: x + attn(norm(x)), then + mlp(norm(·)). Gemma's sandwich adds a norm after each (post_attention_layernorm
/// then normalises the attention output, pre/post_feedforward_layernorm wrap the MLP). Mixtral's MLP is block_sparse_moe.
/// </summary>
public sealed class LlamaDecoderLayer : nn.Module
{
    private readonly LlamaAttention self_attn;
    private Module<Tensor, Tensor>? mlp, block_sparse_moe;
    private Module<Tensor, Tensor> input_layernorm, post_attention_layernorm;
    private Module<Tensor, Tensor>? pre_feedforward_layernorm, post_feedforward_layernorm;

    public LlamaDecoderLayer(LlamaConfig config, int layer, ScalarType dtype, Device device) : base(nameof(LlamaDecoderLayer))
    {
        self_attn = new LlamaAttention(config, layer, dtype, device);
        if (config.Family.MixtureOfExperts) block_sparse_moe = new MixtralSparseMoeBlock(config, dtype, device);
        else if (config.Family.FusedProjections) mlp = new Phi3MLP(config, dtype, device);
        else mlp = new LlamaMLP(config, dtype, device);
        input_layernorm = GemmaRMSNorm.For(config, config.HiddenSize, dtype, device);
        post_attention_layernorm = GemmaRMSNorm.For(config, config.HiddenSize, dtype, device);
        if (config.Family.SandwichNorm)
        {
            pre_feedforward_layernorm = GemmaRMSNorm.For(config, config.HiddenSize, dtype, device);
            post_feedforward_layernorm = GemmaRMSNorm.For(config, config.HiddenSize, dtype, device);
        }
        RegisterComponents();
    }

    public LlamaAttention attention => self_attn;

    /// <summary>Mixtral's routed experts (null for a dense MLP).</summary>
    public MixtralSparseMoeBlock? moe => block_sparse_moe as MixtralSparseMoeBlock;

    public Tensor forward(Tensor x, Tensor cos, Tensor sin, AttentionFunction attention, Tensor? paddingMask, KvCache? cache, int layer)
    {
        using var scope = NewDisposeScope();
        var feedforward = mlp ?? block_sparse_moe!;
        var a = self_attn.forward(input_layernorm.call(x), cos, sin, attention, paddingMask, cache, layer);
        Tensor output;
        if (pre_feedforward_layernorm is null)
        {
            var h = x + a;
            output = h + feedforward.call(post_attention_layernorm.call(h));
        }
        else
        {
            var h = x + post_attention_layernorm.call(a);
            output = h + post_feedforward_layernorm!.call(feedforward.call(pre_feedforward_layernorm.call(h)));
        }
        return output.MoveToOuterDisposeScope();
    }
}

/// <summary>The decoder stack: embeddings, layers, final norm (transformers' LlamaModel, registered as "model").</summary>
public sealed class LlamaModel : nn.Module
{
    private Module<Tensor, Tensor> embed_tokens;
    [ComponentName(Name = "layers")] private readonly ModuleList<LlamaDecoderLayer> _layers = new();
    private Module<Tensor, Tensor> norm;
    private readonly double? embedScale;

    public LlamaModel(LlamaConfig config, ScalarType dtype, Device device) : base(nameof(LlamaModel))
    {
        embed_tokens = Embedding(config.VocabSize, config.HiddenSize, device: device, dtype: dtype);
        for (var i = 0; i < config.NumHiddenLayers; i++) _layers.append(new LlamaDecoderLayer(config, i, dtype, device));
        norm = GemmaRMSNorm.For(config, config.HiddenSize, dtype, device);
        if (config.Family.ScaledEmbeddings) embedScale = Math.Sqrt(config.HiddenSize);
        RegisterComponents();
    }

    public ModuleList<LlamaDecoderLayer> layers => _layers;

    /// <summary>The embedding table (also the output projection when tied): embed_tokens' registered weight.</summary>
    public Tensor embed_weight => embed_tokens.get_parameter("weight")
        ?? throw new InvalidOperationException($"model.embed_tokens is a {embed_tokens.TypeName()} without a 'weight' parameter");

    /// <summary>Token embeddings; Gemma's are multiplied by √hidden_size rounded to the weights' dtype, as transformers does.</summary>
    public Tensor embed(Tensor inputIds)
    {
        if (embedScale is not double scale) return embed_tokens.call(inputIds);
        using var scope = NewDisposeScope();
        var e = embed_tokens.call(inputIds);
        return (e * tensor(scale, e.dtype, e.device)).MoveToOuterDisposeScope();
    }

    public Tensor final_norm(Tensor h) => norm.call(h);
}

/// <summary>
/// A Llama-structured decoder with a language-model head (every family of <see cref="DecoderFamily"/>): logits, chunked
/// training loss (plus Mixtral's router load-balancing loss), KV-cached decoding and the adapter hooks.
/// </summary>
public sealed class LlamaForCausalLM : Module<Tensor, Tensor>, ICausalLanguageModel
{
    [ComponentName(Name = "model")] private readonly LlamaModel _model;
    private Module<Tensor, Tensor>? lm_head;
    private readonly RopeCache rope;
    private readonly RopeCache? localRope;

    public LlamaForCausalLM(LlamaConfig config, ScalarType dtype = ScalarType.Float32, Device? device = null, string nameOrPath = "")
        : base(nameof(LlamaForCausalLM))
    {
        config.Validate();
        Config = config;
        DType = dtype;
        NameOrPath = nameOrPath;
        var dev = device ?? CPU;
        rope = new RopeCache(config, local: false);
        if (config.SlidingRopeTheta is not null) localRope = new RopeCache(config, local: true);
        _model = new LlamaModel(config, dtype, dev);
        lm_head = config.TieWordEmbeddings ? null : Linear(config.HiddenSize, config.VocabSize, false, dev, dtype);
        Attention = DefaultAttention;
        RegisterComponents();
        this.DetachParametersFromDisposeScope();
    }

    public LlamaConfig Config { get; }
    public LlamaModel model => _model;

    /// <summary>The output projection's weight (the embedding's when tied).</summary>
    public Tensor LmHeadWeight => Config.TieWordEmbeddings ? _model.embed_weight
        : (lm_head as TorchSharp.Modules.Linear)?.weight ?? throw new InvalidOperationException($"lm_head is a {lm_head!.TypeName()}, not a Linear: it has no single weight");

    public nn.Module Root => this;
    public Device Device => _model.embed_weight.device;
    public ScalarType DType { get; }
    public string ModelType => Config.ModelType;
    public string NameOrPath { get; set; }
    public IReadOnlyList<string> OutputModuleNames => Config.TieWordEmbeddings ? [] : ["lm_head"];
    public AttentionFunction Attention { get; set; }
    public bool GradientCheckpointing { get; set; }
    public int LayerCount => Config.NumHiddenLayers;
    public int VocabSize => Config.VocabSize;

    private static readonly AttentionFunction DefaultAttentionFunction = DefaultAttention;

    /// <summary>True when <paramref name="attention"/> is <see cref="DefaultAttention"/> (which accepts fewer k/v heads).</summary>
    public static bool IsDefaultAttention(AttentionFunction attention) => DefaultAttentionFunction.Equals(attention);

    /// <summary>
    /// Fused causal SDPA; with padding, an explicit causal + key-padding mask. k/v may have fewer heads than q (grouped-query
    /// attention through torchx's SDPA, see <see cref="torchx.nn.functional.Fused.Gqa"/>).
    /// </summary>
    public static Tensor DefaultAttention(Tensor q, Tensor k, Tensor v, Tensor? paddingMask)
    {
        long t = q.size(2), s = k.size(2);
        var gqa = q.size(1) != k.size(1);
        if (paddingMask is null) return torchx.nn.functional.scaled_dot_product_attention(q, k, v, is_causal: t == s, enable_gqa: gqa);
        using var scope = NewDisposeScope();
        // Query i (at absolute position s − t + i) sees keys up to its own position that are real tokens.
        var causal = ones([t, s], ScalarType.Bool, q.device).tril(s - t);
        var keys = paddingMask.to(ScalarType.Bool).view(paddingMask.size(0), 1, 1, s);
        var mask = causal.view(1, 1, t, s).logical_and(keys);
        // Padding queries have no visible key and would give NaN; let each see itself (the diagonal at offset s − t).
        var self = causal.triu(s - t).view(1, 1, t, s);
        var safe = mask.logical_or(self.logical_and(keys.logical_not()));
        return torchx.nn.functional.scaled_dot_product_attention(q, k, v, safe, enable_gqa: gqa).MoveToOuterDisposeScope();
    }

    // Gemma 3's sliding-window layers rotate with their own (local) base.
    private RopeCache RopeOf(int layer) => localRope is not null && Config.IsSlidingLayer(layer) ? localRope : rope;

    /// <summary>Final hidden states (batch, seq, hidden).</summary>
    public Tensor HiddenStates(Tensor inputIds, Tensor? attentionMask = null, KvCache? cache = null)
    {
        using var scope = NewDisposeScope();
        var start = cache?.Length ?? 0;
        var (cos, sin) = rope.Get(start, inputIds.size(1), inputIds.device);
        var (localCos, localSin) = localRope?.Get(start, inputIds.size(1), inputIds.device) ?? (cos, sin);
        // A mask of all ones changes nothing: drop it so the fused causal kernel is used.
        var mask = attentionMask is not null && attentionMask.eq(0).any().item<bool>() ? attentionMask : null;
        var h = _model.embed(inputIds);
        var layers = _model.layers;
        for (var i = 0; i < layers.Count; i++)
        {
            var (layer, index) = (layers[i], i); // captured by the checkpoint's recomputation, which runs after the loop
            var local = RopeOf(i) != rope;
            var next = GradientCheckpointing && is_grad_enabled() && cache is null
                ? torchx.utils.checkpoint(x => CheckpointedLayer(layer, index, x, mask), h)
                : layer.forward(h, local ? localCos : cos, local ? localSin : sin, Attention, mask, cache, i);
            h.Dispose();
            h = next;
        }
        return _model.final_norm(h).MoveToOuterDisposeScope();
    }

    // Runs again in backward, after HiddenStates' scope has freed its cos/sin views: take fresh ones from the table.
    // The caller's attention mask must stay alive until backward (the trainer's batch does).
    private Tensor CheckpointedLayer(LlamaDecoderLayer layer, int index, Tensor x, Tensor? mask)
    {
        using var scope = NewDisposeScope();
        var (cos, sin) = RopeOf(index).Get(0, x.size(1), x.device);
        return layer.forward(x, cos, sin, Attention, mask, null, index).MoveToOuterDisposeScope();
    }

    /// <summary>Logits (batch, seq, vocab).</summary>
    public override Tensor forward(Tensor input_ids) => Forward(input_ids, null, null);

    public Tensor Forward(Tensor inputIds, Tensor? attentionMask = null) => Forward(inputIds, attentionMask, null);

    /// <summary>Logits; with a cache, <paramref name="inputIds"/> are the new positions only and the mask covers all.</summary>
    public Tensor Forward(Tensor inputIds, Tensor? attentionMask, KvCache? cache)
    {
        using var scope = NewDisposeScope();
        var h = HiddenStates(inputIds, attentionMask, cache);
        // Through the module, so a method that replaces lm_head is honoured.
        var logits = lm_head is null ? nn.functional.linear(h, _model.embed_weight) : lm_head.call(h);
        return SoftCap(logits).MoveToOuterDisposeScope();
    }

    // Gemma 2's final_logit_softcapping: cap · tanh(logits / cap).
    private Tensor SoftCap(Tensor logits) => Config.FinalLogitSoftcapping is double cap ? (logits / cap).tanh() * cap : logits;

    /// <summary>
    /// Whether <see cref="ComputeLoss"/> adds Mixtral's router load-balancing loss (router_aux_loss_coef × the loss of
    /// <see cref="RouterLoss"/>): in training mode, or when config.json's output_router_logits asks for it in eval too.
    /// (transformers adds it only with output_router_logits; training a MoE without it lets routing collapse.)
    /// </summary>
    public bool AddsRouterAuxLoss => Config.IsMixtureOfExperts && Config.RouterAuxLossCoef > 0 && (training || Config.OutputRouterLogits);

    /// <summary>The router load-balancing loss of the last <see cref="ComputeLoss"/> that added it (detached), for logging.</summary>
    public float? LastRouterAuxLoss { get; private set; }

    /// <summary>
    /// Next-token loss: labels shifted left by one, -100 ignored, logits made 1024 rows at a time; for a Mixtral in training
    /// plus the router load-balancing loss (see <see cref="AddsRouterAuxLoss"/>).
    /// </summary>
    public Tensor ComputeLoss(Tensor inputIds, Tensor labels, Tensor? attentionMask = null)
    {
        using var scope = NewDisposeScope();
        if (!AddsRouterAuxLoss) return LanguageModelLoss(inputIds, labels, attentionMask).MoveToOuterDisposeScope();
        if (GradientCheckpointing && is_grad_enabled())
            throw new NotSupportedException("the router load-balancing loss needs the router logits of the forward pass, which gradient checkpointing " +
                "does not keep: turn gradient checkpointing off for this MoE model, or set router_aux_loss_coef to 0 in config.json");
        var logits = new List<Tensor>();
        var blocks = _model.layers.Select(l => l.moe!).ToList();
        try
        {
            foreach (var block in blocks) block.RouterLogitsSink = logits;
            var loss = LanguageModelLoss(inputIds, labels, attentionMask);
            var aux = RouterLoss.LoadBalancing(logits, Config.NumLocalExperts!.Value, Config.NumExpertsPerTok, attentionMask);
            LastRouterAuxLoss = aux.detach().item<float>();
            return (loss + aux * Config.RouterAuxLossCoef).MoveToOuterDisposeScope();
        }
        finally
        {
            foreach (var block in blocks) block.RouterLogitsSink = null;
            foreach (var l in logits) l.Dispose();
        }
    }

    private Tensor LanguageModelLoss(Tensor inputIds, Tensor labels, Tensor? attentionMask)
    {
        using var scope = NewDisposeScope();
        var h = HiddenStates(inputIds, attentionMask);
        long t = inputIds.size(1);
        var hidden = h.narrow(1, 0, t - 1).reshape(-1, Config.HiddenSize);
        var targets = labels.narrow(1, 1, t - 1).reshape(-1);
        if ((lm_head is not null and not TorchSharp.Modules.Linear) || Config.FinalLogitSoftcapping is not null)
        {
            // A replaced head has no single weight to chunk over, and capped logits are not a plain projection: take them whole (fp32).
            var head = lm_head is null ? nn.functional.linear(hidden, _model.embed_weight) : lm_head.call(hidden);
            var logits = SoftCap(head.to(ScalarType.Float32));
            return nn.functional.cross_entropy(logits, targets).MoveToOuterDisposeScope();
        }
        return torchx.nn.functional.chunked_cross_entropy(hidden, LmHeadWeight, targets, 1024).MoveToOuterDisposeScope();
    }

    public string ConfigJson()
    {
        Config.TorchDType = DType.ToString().ToLowerInvariant(); // Float32, BFloat16, Float16 -> transformers' float32, bfloat16, float16
        return Config.ToJson();
    }

    // Old checkpoints stored the rotary inverse frequencies; tied ones may still carry lm_head.weight.
    public bool IsIgnorableCheckpointKey(string key) =>
        key.EndsWith("rotary_emb.inv_freq", StringComparison.Ordinal) || (key == "lm_head.weight" && Config.TieWordEmbeddings);

    /// <summary>A randomly initialised model (std 0.02 as transformers' initializer_range), for tests and benchmarks.</summary>
    public static LlamaForCausalLM CreateRandom(LlamaConfig config, ScalarType dtype = ScalarType.Float32, Device? device = null, long seed = 0)
    {
        torchx.manual_seed(seed);
        var m = new LlamaForCausalLM(config, dtype, device);
        using var _ = no_grad();
        foreach (var (name, p) in m.named_parameters())
        {
            if (name.EndsWith("norm.weight")) continue;
            if (name.EndsWith(".bias")) p.zero_();
            else p.normal_(0, 0.02);
        }
        return m;
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            rope.Dispose();
            localRope?.Dispose();
        }
        base.Dispose(disposing);
    }

    /// <summary>cos/sin tables for positions [0, n), grown and moved on demand; not part of the state dict.</summary>
    private sealed class RopeCache(LlamaConfig config, bool local) : IDisposable
    {
        private Tensor? cos, sin;

        public (Tensor cos, Tensor sin) Get(long start, long length, Device device)
        {
            var needed = start + length;
            if (cos is null || sin is null || cos.size(0) < needed || cos.device != device)
            {
                Dispose();
                var size = (int)Math.Max(needed, Math.Min(config.MaxPositionEmbeddings, 4096));
                var (c, s) = RotaryEmbedding.Tables(config, size, device, local);
                (cos, sin) = (c.DetachFromDisposeScope(), s.DetachFromDisposeScope());
            }
            return (cos.narrow(0, start, length), sin.narrow(0, start, length));
        }

        public void Dispose()
        {
            cos?.Dispose();
            sin?.Dispose();
            (cos, sin) = (null, null);
        }
    }
}
