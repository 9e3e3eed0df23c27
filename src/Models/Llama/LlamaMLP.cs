using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;

namespace LoRAHub.Models.Llama;

/// <summary>
/// Gated feed-forward: down(act(gate(x)) · up(x)), SwiGLU (silu) or Gemma's GeGLU (tanh gelu). Over a long input it runs
/// in token chunks, forward and backward (<see cref="ChunkedMlp"/>), so its tokens × intermediate tensors never exist whole.
/// </summary>
public sealed class LlamaMLP : Module<Tensor, Tensor>
{
    private readonly string activation;
    private readonly long intermediate;
    private Module<Tensor, Tensor> gate_proj, up_proj, down_proj;

    public LlamaMLP(LlamaConfig config, ScalarType dtype, Device device) : base(nameof(LlamaMLP))
    {
        activation = config.Activation;
        intermediate = config.IntermediateSize;
        gate_proj = Linear(config.HiddenSize, config.IntermediateSize, config.MlpBias, device, dtype);
        up_proj = Linear(config.HiddenSize, config.IntermediateSize, config.MlpBias, device, dtype);
        down_proj = Linear(config.IntermediateSize, config.HiddenSize, config.MlpBias, device, dtype);
        RegisterComponents();
    }

    /// <summary>
    /// Tokens per chunk for this block, overriding <see cref="ChunkedMlp"/>'s choice (0: never chunk; null: its choice).
    /// Chunks run along the sequence (the dimension before the features) with the batch whole: tokens / batch positions each.
    /// </summary>
    public long? sequence_chunk_size { get; set; }

    public override Tensor forward(Tensor x)
    {
        if (x.dim() < 2) return Whole(x);
        var positions = x.size(-2);
        var perChunk = PositionsPerChunk(x.numel() / Math.Max(1, x.size(-1)), positions, x.element_size());
        // Every path per chunk (fused LoRA block, DoRA, 4-bit bases, composite): the positions are independent here.
        // Dropout (LoRA's) draws random numbers only in training: only then must the chunks' recomputation repeat them.
        return perChunk < positions ? torchx.utils.sequence_chunked(Whole, x, perChunk, preserve_rng_state: training) : Whole(x);
    }

    /// <summary>
    /// Whether an input of <paramref name="tokens"/> tokens in <paramref name="positions"/> sequence positions runs in
    /// token chunks (then only the input is kept for backward): what a checkpoint plan counts for this block.
    /// </summary>
    public bool runs_chunked(long tokens, long positions, long element_size) => PositionsPerChunk(tokens, positions, element_size) < positions;

    // Positions per chunk (all positions: run whole) from this block's override or ChunkedMlp's choice.
    private long PositionsPerChunk(long tokens, long positions, long elementSize)
    {
        var chunk = sequence_chunk_size is { } fixedSize ? (fixedSize > 0 ? fixedSize : (long?)null)
            : ChunkedMlp.ChunkSize(tokens, intermediate, elementSize);
        return chunk is { } c ? Math.Max(1, c / Math.Max(1, tokens / Math.Max(1, positions))) : positions;
    }

    /// <summary>
    /// residual + forward(x), the decoder layer's output: with the fused LoRA block (<see cref="LoraFusion.TryMlpResidual"/>)
    /// the residual goes into it, where on CUDA one kernel adds down_proj's update, its DoRA row scale and the residual
    /// after the base GEMM; otherwise (chunked, composite) forward(x) is added to it as a tensor op. Module hooks of this
    /// block do not run (the caller's layer sees the output).
    /// </summary>
    public Tensor forward_add(Tensor x, Tensor residual)
    {
        if (x.dim() < 2 || runs_chunked(x.numel() / Math.Max(1, x.size(-1)), x.size(-2), x.element_size())) return residual + forward(x);
        // The fused LoRA block where it is exact; it records the path taken.
        if (LoraFusion.TryMlpResidual(this, activation, gate_proj, up_proj, down_proj, x, residual) is { } fused) return fused;
        using var scope = NewDisposeScope();
        return residual.add(Composite(x)).MoveToOuterDisposeScope();
    }

    private Tensor Whole(Tensor x) =>
        // The fused LoRA block where it is exact (torchx.nn.functional.Fused.LoraMlp); it records the path taken.
        LoraFusion.TryMlp(this, activation, gate_proj, up_proj, down_proj, x) ?? Composite(x);

    private Tensor Composite(Tensor x)
    {
        using var scope = NewDisposeScope();
        var h = GatedActivation.Apply(activation, gate_proj.call(x), up_proj.call(x));
        return down_proj.call(h).MoveToOuterDisposeScope();
    }
}
