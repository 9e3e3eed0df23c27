using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;

namespace LoRAHub.Models.Llama;

// The Llama family (Llama 2/3, TinyLlama, Mistral, Qwen2 and the DecoderFamily kin), as TorchSharp modules, one class per file. Field names are
// transformers' module names, so state_dict keys are transformers' keys and adapter keys match PEFT's. Children an
// adapter may wrap are fields typed Module<Tensor, Tensor>: `replace_submodule` sets the field, and forward reads it.

/// <summary>
/// A Llama-structured decoder with a language-model head (every family of <see cref="DecoderFamily"/>): logits, chunked
/// training loss (plus Mixtral's router load-balancing loss), KV-cached decoding and the adapter hooks.
/// </summary>
public sealed partial class LlamaForCausalLM : Module<Tensor, Tensor>, ICausalLanguageModel
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
        // A full boolean mask (batch, 1, t, s), e.g. packed rows' block-diagonal causal mask: attend as it says, or (CUDA)
        // one causal call per packed example (PackedAttention), the same attention without the mask.
        // Masks come with shapes that change from batch to batch: never cuDNN's attention, which builds a graph per shape.
        using var noCudnn = torchx.backends.cuda.without_cudnn_sdp(q);
        if (paddingMask.dim() == 4)
            return PackedAttention.SplitFor(paddingMask, q) is { } segments && t == s
                ? PackedAttention.Forward(q, k, v, segments, gqa)
                : torchx.nn.functional.scaled_dot_product_attention(q, k, v, paddingMask, enable_gqa: gqa);
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
    /// <remarks>
    /// <paramref name="positionIds"/> (batch, seq), for packed rows: several examples per row, positions restarting at
    /// each (see <see cref="ForwardPacked"/>); rotary tables are gathered per position and attention is block-diagonal.
    /// </remarks>
    public Tensor HiddenStates(Tensor inputIds, Tensor? attentionMask = null, KvCache? cache = null, Tensor? positionIds = null)
    {
        using var scope = NewDisposeScope();
        if (positionIds is not null) CheckPositionIds(inputIds, attentionMask, cache, positionIds);
        var segments = positionIds is null ? null : PackedAttention.Segments(positionIds); // checks the ids' range on the host
        var start = cache?.Length ?? 0;
        var (cos, sin) = positionIds is null ? rope.Get(start, inputIds.size(1), inputIds.device) : rope.Gather(positionIds);
        var (localCos, localSin) = (positionIds is null ? localRope?.Get(start, inputIds.size(1), inputIds.device) : localRope?.Gather(positionIds)) ?? (cos, sin);
        // A mask of all ones changes nothing: drop it so the fused causal kernel is used. Packed rows: block-diagonal causal.
        var mask = positionIds is not null ? PackedAttention.WithSegments(MaskedAttention.PackedCausalMask(positionIds), segments!)
            : attentionMask is not null && attentionMask.eq(0).any().item<bool>() ? attentionMask : null;
        var h = Embed(inputIds); // data parallelism may take the lookup (LlamaForCausalLM.EmbeddingLookupHook.cs)
        var layers = _model.layers;
        var plan = CheckpointPlan(inputIds, cache); // keep / checkpoint / checkpoint + offload, per layer (LlamaForCausalLM.Checkpointing.cs)
        for (var i = 0; i < layers.Count; i++)
        {
            h = HookLayerInput(i, h); // data parallelism's gradient-sync point (LlamaForCausalLM.LayerInputHook.cs)
            var (layer, index) = (layers[i], i); // captured by the checkpoint's recomputation, which runs after the loop
            var local = RopeOf(i) != rope;
            var next = plan[i] != LayerCheckpoint.Keep
                ? torchx.utils.checkpoint(x => CheckpointedLayer(layer, index, x, mask, positionIds), h, offload: plan[i] == LayerCheckpoint.Offload)
                : layer.forward(h, local ? localCos : cos, local ? localSin : sin, Attention, mask, cache, i);
            h.Dispose();
            h = next;
        }
        h = HookLayerInput(layers.Count, h);
        return _model.final_norm(h).MoveToOuterDisposeScope();
    }

    // Runs again in backward, after HiddenStates' scope has freed its cos/sin views: take fresh ones from the table.
    // The caller's attention mask (and position ids) must stay alive until backward (the trainer's batch does); a packed
    // row's mask was HiddenStates' own and is freed: make it again from the position ids.
    private Tensor CheckpointedLayer(LlamaDecoderLayer layer, int index, Tensor x, Tensor? mask, Tensor? positionIds = null)
    {
        using var scope = NewDisposeScope();
        var (cos, sin) = positionIds is null ? RopeOf(index).Get(0, x.size(1), x.device) : RopeOf(index).Gather(positionIds);
        if (positionIds is not null) mask = PackedAttention.WithSegments(MaskedAttention.PackedCausalMask(positionIds), PackedAttention.Segments(positionIds));
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

    private Tensor LanguageModelLoss(Tensor inputIds, Tensor labels, Tensor? attentionMask, Tensor? positionIds = null)
    {
        using var scope = NewDisposeScope();
        var h = HiddenStates(inputIds, attentionMask, null, positionIds);
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
        return torchx.nn.functional.chunked_cross_entropy(hidden, LmHeadWeight, targets, torchx.nn.functional.CrossEntropyChunk).MoveToOuterDisposeScope();
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
            if (cos is null || sin is null || cos.size(0) < needed || !torchx.is_on(cos, device))
            {
                Dispose();
                var size = (int)Math.Max(needed, Math.Min(config.MaxPositionEmbeddings, 4096));
                var (c, s) = RotaryEmbedding.Tables(config, size, device, local);
                (cos, sin) = (c.DetachFromDisposeScope(), s.DetachFromDisposeScope());
            }
            return (cos.narrow(0, start, length), sin.narrow(0, start, length));
        }

        /// <summary>Tables at given positions: (batch, seq) ids give (batch, seq, rotary dims).</summary>
        public (Tensor cos, Tensor sin) Gather(Tensor positionIds)
        {
            // Packed positions restart within a row, so none reaches the row's length.
            var (c, s) = Get(0, positionIds.size(-1), positionIds.device);
            var flat = positionIds.reshape(-1);
            return (c.index_select(0, flat).view(positionIds.size(0), positionIds.size(1), -1),
                    s.index_select(0, flat).view(positionIds.size(0), positionIds.size(1), -1));
        }

        public void Dispose()
        {
            cos?.Dispose();
            sin?.Dispose();
            (cos, sin) = (null, null);
        }
    }
}
