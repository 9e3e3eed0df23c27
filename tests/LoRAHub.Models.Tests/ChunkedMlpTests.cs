using LoRAHub.Models.Llama;
using LoRAHub.Plugins.LoRA;
using LoRAHub.Tuners.Lora;

namespace LoRAHub.Models.Tests;

/// <summary>
/// The MLP over token chunks (<see cref="ChunkedMlp"/>, <see cref="torchx.utils.sequence_chunked"/>) computes what the
/// whole MLP does: output, input gradient and the LoRA A/B gradients, on the composite and the fused LoRA path, under
/// dropout, inside checkpointed layers. On CUDA when LORAHUB_TEST_DEVICE=cuda. Alone: the dropout tests need the global
/// random generators to themselves.
/// </summary>
[Collection(RunsAlone.Name)]
public sealed class ChunkedMlpTests
{
    private static readonly bool Cuda = TinyModels.Device.type == DeviceType.CUDA;
    // fp32, relative to the largest value (beyond 1); CUDA GEMMs of other row counts may pick other kernels (summation order).
    private static readonly float Tolerance = Cuda ? 1e-4f : 1e-6f;

    private static (LlamaForCausalLM model, IAdapter adapter) LoraModel(Device device, double dropout = 0.0, ScalarType dtype = ScalarType.Float32)
    {
        var model = LlamaForCausalLM.CreateRandom(TinyModels.LlamaConfig(), dtype, device, seed: 3);
        var adapter = new LoraMethod().Attach(model, new LoraOptions
        {
            R = 2, LoraAlpha = 4, LoraDropout = dropout, TargetModules = new[] { "gate_proj", "up_proj", "down_proj", "q_proj", "v_proj" },
        });
        // B starts at zero, which would leave A's gradient zero: random B, so both are checked.
        using (no_grad())
        {
            manual_seed(11);
            foreach (var (name, p) in model.named_parameters())
                if (name.Contains("lora_B")) p.copy_(randn(p.shape, p.dtype).mul_(0.5));
        }
        return (model, adapter);
    }

    private static LlamaMLP Mlp(LlamaForCausalLM model, int layer = 0) => (LlamaMLP)model.get_submodule($"model.layers.{layer}.mlp")!;

    // Output, input gradient and every LoRA gradient of y = f(x), backpropagated from a fixed dy.
    private static (Tensor y, Tensor dx, Dictionary<string, Tensor> grads) Run(LlamaForCausalLM model, Func<Tensor, Tensor> f, Tensor x0, Tensor dy)
    {
        foreach (var p in model.parameters()) p.grad = null;
        var x = x0.detach().clone().requires_grad_(true);
        var y = f(x);
        y.backward([dy]);
        var grads = model.named_parameters().Where(p => p.name.Contains("lora_")).ToDictionary(p => p.name, p => p.parameter.grad?.clone() ?? zeros_like(p.parameter));
        return (y.detach(), x.grad!.clone(), grads);
    }

    private static void AssertSame((Tensor y, Tensor dx, Dictionary<string, Tensor> grads) whole, (Tensor y, Tensor dx, Dictionary<string, Tensor> grads) chunked,
        float tolerance, string only = "layers.0.mlp.")
    {
        Assert.Equal(whole.y.shape, chunked.y.shape);
        float Scale(Tensor t) => Math.Max(1f, t.abs().max().item<float>()); // relative to the largest value beyond 1
        Assert.True(TinyModels.MaxAbsDiff(whole.y, chunked.y) <= tolerance * Scale(whole.y), $"output differs by {TinyModels.MaxAbsDiff(whole.y, chunked.y)}");
        Assert.True(TinyModels.MaxAbsDiff(whole.dx, chunked.dx) <= tolerance * Scale(whole.dx), $"input gradient differs by {TinyModels.MaxAbsDiff(whole.dx, chunked.dx)}");
        var checkedAny = 0;
        foreach (var (name, g) in whole.grads)
        {
            if (!name.Contains(only)) continue;
            var scale = Scale(g);
            Assert.True(g.abs().sum().item<float>() > 0, $"{name} got no gradient: the comparison would prove nothing");
            Assert.True(TinyModels.MaxAbsDiff(g, chunked.grads[name]) <= tolerance * scale, $"{name} differs by {TinyModels.MaxAbsDiff(g, chunked.grads[name])}");
            checkedAny++;
        }
        Assert.True(checkedAny >= 6, $"only {checkedAny} LoRA gradients compared"); // A and B of gate, up and down at least
    }

    [Fact]
    public void Chunks_that_do_not_divide_the_sequence_give_the_whole_mlps_output_and_gradients()
    {
        using var scope = NewDisposeScope();
        var (model, adapter) = LoraModel(TinyModels.Device);
        using var _ = model;
        using var __ = adapter;
        var mlp = Mlp(model);
        manual_seed(5);
        var x = randn(2, 7, 32, device: TinyModels.Device);
        var dy = randn(2, 7, 32, device: TinyModels.Device);
        mlp.sequence_chunk_size = 0;
        var whole = Run(model, mlp.call, x, dy);
        foreach (var chunk in new long[] { 6, 3, 1 }) // 7 = 6 + 1 = 3 + 3 + 1 = 7 × 1 positions (× 2 batch rows each)
        {
            mlp.sequence_chunk_size = chunk * 2;
            AssertSame(whole, Run(model, mlp.call, x, dy), Tolerance);
        }
        // A chunk at least as long as the sequence runs the MLP whole.
        mlp.sequence_chunk_size = 14;
        AssertSame(whole, Run(model, mlp.call, x, dy), 0f);
    }

    [Fact]
    public void The_fused_lora_block_chunked_matches_it_whole()
    {
        using var scope = NewDisposeScope();
        var (model, adapter) = LoraModel(TinyModels.Device);
        using var _ = model;
        using var __ = adapter;
        var mlp = Mlp(model);
        var (gate, up, down) = (mlp.get_submodule("gate_proj")!, mlp.get_submodule("up_proj")!, mlp.get_submodule("down_proj")!);
        Tensor Fused(Tensor t) => LoraFusion.TryMlp(mlp, "silu", gate, up, down, t, fused: true)
            ?? throw new InvalidOperationException("the fused LoRA MLP block was not taken");
        manual_seed(6);
        var x = randn(1, 11, 32, device: TinyModels.Device);
        var dy = randn(1, 11, 32, device: TinyModels.Device);
        var whole = Run(model, Fused, x, dy);
        var chunked = Run(model, t => torchx.utils.sequence_chunked(Fused, t, 4), x, dy); // 4 + 4 + 3
        AssertSame(whole, chunked, Tolerance);
    }

    [Fact]
    public void Dropout_masks_repeat_when_backward_recomputes_the_chunks()
    {
        // The CPU generator (the CUDA one is reseeded as checkpoint's, tested there): the chunked function's gradients must
        // be those of the same chunks run with autograd and the same random numbers.
        using var scope = NewDisposeScope();
        var (model, adapter) = LoraModel(CPU, dropout: 0.5);
        using var _ = model;
        using var __ = adapter;
        model.train();
        var mlp = Mlp(model);
        mlp.sequence_chunk_size = 0;
        manual_seed(7);
        var x = randn(1, 9, 32);
        var dy = randn(1, 9, 32);
        manual_seed(8);
        var reference = Run(model, t => cat(new[] { mlp.call(t.narrow(1, 0, 4)), mlp.call(t.narrow(1, 4, 4)), mlp.call(t.narrow(1, 8, 1)) }, 1), x, dy);
        manual_seed(8);
        var chunked = Run(model, t => torchx.utils.sequence_chunked(mlp.call, t, 4), x, dy);
        AssertSame(reference, chunked, 1e-6f);
        // Dropout did act: the whole MLP (other masks) gives another output.
        manual_seed(8);
        var whole = Run(model, mlp.call, x, dy);
        Assert.True(TinyModels.MaxAbsDiff(whole.y, chunked.y) > 1e-3f);
    }

    [Fact]
    public void A_checkpointed_model_with_chunked_mlps_trains_as_the_plain_one()
    {
        using var scope = NewDisposeScope();
        var (model, adapter) = LoraModel(TinyModels.Device);
        using var _ = model;
        using var __ = adapter;
        var ids = TinyModels.Ids(new long[,] { { 1, 2, 3, 4, 5, 6, 7, 8, 9 }, { 9, 8, 7, 6, 5, 4, 3, 2, 1 } });
        (float loss, Dictionary<string, Tensor> grads) Step()
        {
            foreach (var p in model.parameters()) p.grad = null;
            using var loss = model.ComputeLoss(ids, ids);
            loss.backward();
            return (loss.item<float>(), model.named_parameters().Where(p => p.parameter.grad is not null).ToDictionary(p => p.name, p => p.parameter.grad!.clone()));
        }
        void Chunk(long? size)
        {
            for (var i = 0; i < 2; i++) Mlp(model, i).sequence_chunk_size = size;
        }
        Chunk(0);
        var plain = Step();
        Chunk(4); // 2 positions × 2 rows per chunk: 9 = 2 + 2 + 2 + 2 + 1
        model.GradientCheckpointing = true;
        var chunked = Step();
        Assert.Equal(plain.loss, chunked.loss, 5);
        Assert.Equal(plain.grads.Keys.Order(), chunked.grads.Keys.Order());
        Assert.Contains(plain.grads.Keys, k => k.Contains("mlp.down_proj.lora_A"));
        foreach (var (name, g) in plain.grads)
            Assert.True(TinyModels.MaxAbsDiff(g, chunked.grads[name]) <= 10 * Tolerance, $"{name} differs by {TinyModels.MaxAbsDiff(g, chunked.grads[name])}");
    }

    [Fact]
    public void On_cuda_in_bf16_the_chunked_mlp_matches_it_whole_within_rounding()
    {
        if (!Cuda) return; // the training dtype of the long-sequence runs; fp32 is covered above on either device
        using var scope = NewDisposeScope();
        var model = LlamaForCausalLM.CreateRandom(TinyModels.LlamaConfig(), ScalarType.BFloat16, TinyModels.Device, seed: 4);
        using var _ = model;
        using var adapter = new LoraMethod().Attach(model, new LoraOptions { R = 4, LoraAlpha = 8, TargetModules = new[] { "gate_proj", "up_proj", "down_proj" } });
        using (no_grad())
        {
            manual_seed(12);
            foreach (var (name, p) in model.named_parameters())
                if (name.Contains("lora_B")) p.copy_(randn(p.shape, ScalarType.Float32).mul_(0.5).to(p.dtype));
        }
        var mlp = Mlp(model);
        manual_seed(13);
        var x = randn(1, 300, 32, device: TinyModels.Device).to(ScalarType.BFloat16);
        var dy = randn(1, 300, 32, device: TinyModels.Device).to(ScalarType.BFloat16);
        mlp.sequence_chunk_size = 0;
        var whole = Run(model, mlp.call, x, dy);
        mlp.sequence_chunk_size = 128; // 128 + 128 + 44
        var chunked = Run(model, mlp.call, x, dy);
        float Relative(Tensor a, Tensor b) => TinyModels.MaxAbsDiff(a.to(ScalarType.Float32), b.to(ScalarType.Float32)) / Math.Max(1e-6f, a.abs().max().to(ScalarType.Float32).item<float>());
        Assert.True(Relative(whole.y, chunked.y) < 2e-2f, $"output differs by {Relative(whole.y, chunked.y)} of its largest value");
        Assert.True(Relative(whole.dx, chunked.dx) < 2e-2f, $"input gradient differs by {Relative(whole.dx, chunked.dx)}");
        foreach (var (name, g) in whole.grads.Where(kv => kv.Key.Contains("layers.0.mlp.")))
        {
            Assert.True(g.abs().sum().to(ScalarType.Float32).item<float>() > 0, $"{name} got no gradient");
            Assert.True(Relative(g, chunked.grads[name]) < 3e-2f, $"{name} differs by {Relative(g, chunked.grads[name])}");
        }
    }

    [Fact]
    public void Under_dropout_a_checkpointed_model_with_chunked_mlps_gets_the_gradient_of_its_loss()
    {
        // The checkpoint's forward runs the chunks without grad, its recomputation with grad, and backward once more: all
        // three must draw the same dropout masks (on CUDA too, where the generator is reseeded), or the gradient is not
        // that of the loss. Checked against central differences along a random direction, masks fixed by the seed; in
        // float64, so that the differences are exact well below the tolerance.
        using var scope = NewDisposeScope();
        var (model, adapter) = LoraModel(TinyModels.Device, dropout: 0.5, dtype: ScalarType.Float64);
        using var _ = model;
        using var __ = adapter;
        model.train();
        model.GradientCheckpointing = true;
        for (var i = 0; i < 2; i++) Mlp(model, i).sequence_chunk_size = 6; // 3 positions × 2 rows: 9 = 3 + 3 + 3
        var ids = TinyModels.Ids(new long[,] { { 1, 2, 3, 4, 5, 6, 7, 8, 9 }, { 9, 8, 7, 6, 5, 4, 3, 2, 1 } });
        var lora = model.named_parameters().Where(p => p.name.Contains("mlp.") && p.name.Contains("lora_")).Select(p => p.parameter).ToList();
        Assert.Equal(12, lora.Count);
        Tensor Loss()
        {
            manual_seed(21);
            return model.ComputeLoss(ids, ids);
        }
        foreach (var p in model.parameters()) p.grad = null;
        using (var loss = Loss()) loss.backward();
        manual_seed(22);
        var direction = lora.Select(p => randn(p.shape, p.dtype, p.device)).ToList();
        var analytic = lora.Zip(direction).Sum(pv => (pv.First.grad! * pv.Second).sum().item<double>());
        const double eps = 1e-6; // the loss is strongly curved along a random direction: a small step, float64
        double Shifted(double sign)
        {
            using (no_grad())
                foreach (var (p, v) in lora.Zip(direction)) p.add_(v, alpha: sign * eps);
            try
            {
                using var loss = Loss(); // with grad, as above: checkpoint and chunks take the same paths
                return loss.item<double>();
            }
            finally
            {
                using (no_grad())
                    foreach (var (p, v) in lora.Zip(direction)) p.add_(v, alpha: -sign * eps);
            }
        }
        var numeric = (Shifted(1) - Shifted(-1)) / (2 * eps);
        Assert.True(Math.Abs(analytic) > 0.05, $"directional derivative {analytic} too small to tell");
        // Wrong masks anywhere (forward, recomputation, chunks) leave gradient·v off by tens of percent.
        Assert.True(Math.Abs(numeric - analytic) <= 1e-5 * Math.Abs(analytic), $"gradient·v {analytic} but the loss changes at {numeric}");
    }

    [Fact]
    public void Without_grad_the_chunks_write_one_output()
    {
        using var scope = NewDisposeScope();
        var (model, adapter) = LoraModel(TinyModels.Device);
        using var _ = model;
        using var __ = adapter;
        var mlp = Mlp(model);
        manual_seed(9);
        var x = randn(3, 5, 32, device: TinyModels.Device);
        using var noGrad = no_grad();
        mlp.sequence_chunk_size = 0;
        var whole = mlp.call(x);
        mlp.sequence_chunk_size = 6; // 2 positions × 3 rows
        var chunked = mlp.call(x);
        Assert.False(chunked.requires_grad);
        Assert.True(TinyModels.MaxAbsDiff(whole, chunked) <= Tolerance * Math.Max(1f, whole.abs().max().item<float>()));
    }

    [Fact]
    public void A_checkpoint_budget_counts_a_chunked_mlp_by_its_input_only()
    {
        // 6 tokens, hidden 32, k/v 2 heads × 8, intermediate 64, 4 heads, fp32: a chunked MLP keeps no gate/up/product.
        var kept = CheckpointPolicy.DecoderLayerActivationBytes(6, 32, 16, 64, 4, 4);
        var keptChunked = CheckpointPolicy.DecoderLayerActivationBytes(6, 32, 16, 64, 4, 4, mlp_chunked: true);
        Assert.Equal(6L * 3 * 64 * 4, kept - keptChunked);
        using var model = TinyModels.Llama();
        var ids = TinyModels.Ids(new long[,] { { 1, 2, 3, 4, 5, 6 } });
        model.CheckpointPolicy = CheckpointPolicy.Budget(2 * keptChunked); // two chunked layers fit, two whole ones do not
        Assert.Equal([LayerCheckpoint.Checkpoint, LayerCheckpoint.Keep], model.CheckpointPlan(ids));
        try
        {
            (ChunkedMlp.Enabled, ChunkedMlp.ChunkTokens) = (true, 2);
            Assert.Equal([LayerCheckpoint.Keep, LayerCheckpoint.Keep], model.CheckpointPlan(ids));
        }
        finally
        {
            (ChunkedMlp.Enabled, ChunkedMlp.ChunkTokens) = (null, null);
        }
    }

    [Fact]
    public void The_automatic_choice_chunks_only_long_inputs()
    {
        // llama-7b (intermediate 11008, bf16): one tokens × intermediate tensor reaches 1 GiB from 48,771 tokens.
        Assert.Null(ChunkedMlp.Enabled); // LORAHUB_MLP_CHUNK is not set for the tests
        Assert.Null(ChunkedMlp.ChunkSize(2 * 2048, 11008, 2));
        Assert.Null(ChunkedMlp.ChunkSize(48_000, 11008, 2));
        Assert.Equal(5120, ChunkedMlp.ChunkSize(98_304, 11008, 2)); // 128 MiB / (11008 × 2 bytes), in multiples of 1024
        Assert.Equal(8192, ChunkedMlp.ChunkSize(131_072, 8192, 2)); // llama-3.2-1b
        Assert.Null(ChunkedMlp.ChunkSize(4 * 2048, 8192, 2));
        // Forced on: whenever more tokens than a chunk; forced off: never.
        try
        {
            ChunkedMlp.Enabled = true;
            Assert.Equal(5120, ChunkedMlp.ChunkSize(20_000, 11008, 2));
            Assert.Null(ChunkedMlp.ChunkSize(5_120, 11008, 2));
            ChunkedMlp.Enabled = false;
            Assert.Null(ChunkedMlp.ChunkSize(1_000_000, 11008, 2));
        }
        finally
        {
            ChunkedMlp.Enabled = null;
        }
    }

    [Fact]
    public void Any_per_row_function_chunks_along_the_given_dimension_with_its_parameters_gradients()
    {
        // dim 0 of a 2-d input that does not require grad: the parameter still gets its gradient (accumulated per chunk).
        using var scope = NewDisposeScope();
        manual_seed(31);
        var w = randn(3, device: TinyModels.Device).requires_grad_(true);
        var x = randn(7, 3, device: TinyModels.Device);
        var dy = randn(7, 3, device: TinyModels.Device);
        Tensor F(Tensor t) => (t * w).tanh() * 2;
        (Tensor y, Tensor dw) Grad(Func<Tensor, Tensor> f)
        {
            w.grad = null;
            var y = f(x);
            y.backward([dy]);
            return (y.detach(), w.grad!.clone());
        }
        var whole = Grad(F);
        var chunked = Grad(t => torchx.utils.sequence_chunked(F, t, 3, dim: 0)); // 3 + 3 + 1
        Assert.True(TinyModels.MaxAbsDiff(whole.y, chunked.y) <= 1e-6f);
        Assert.True(whole.dw.abs().sum().item<float>() > 0);
        Assert.True(TinyModels.MaxAbsDiff(whole.dw, chunked.dw) <= 1e-5f, $"dw differs by {TinyModels.MaxAbsDiff(whole.dw, chunked.dw)}");
    }

    [Fact]
    public void Arguments_are_checked()
    {
        using var x = randn(3, 2);
        Assert.Throws<ArgumentOutOfRangeException>(() => torchx.utils.sequence_chunked(t => t, x, 0));
        Assert.Throws<ArgumentOutOfRangeException>(() => torchx.utils.sequence_chunked(t => t, x, 1, dim: 2));
        // f must keep the chunked dimension's size (here the first chunk of 2 rows comes back as 1).
        Assert.Throws<InvalidOperationException>(() =>
        {
            using var noGrad = no_grad();
            torchx.utils.sequence_chunked(t => t.sum(dim: 0, keepdim: true), x, 2, dim: 0);
        });
    }
}
