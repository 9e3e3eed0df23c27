using LoRAHub.TorchExtensions.Modules;
using TorchSharp.Modules;
using FX = LoRAHub.TorchExtensions.torchx.nn.functional;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>
/// The fused q/k/v block's stacked frozen bases (<see cref="StackedBases"/>): re-homing puts the three weights back to
/// back in one storage (same Parameter objects, same values, same saved bytes, no second copy), the stacked forward and
/// backward GEMMs give the three-GEMM results (outputs and gradients of x, A, B; GQA and MHA widths; with biases), a
/// separated weight is re-homed again and ineligible bases (4-bit, tied, not Parameters) keep one GEMM each; on CUDA the
/// rope kernel's backward hands q, k, v's gradients over as adjacent column blocks of one buffer, so dx is one GEMM. In
/// the serial collection: the tests switch <see cref="StackedBases.Enabled"/> and read its process-wide counters.
/// </summary>
[Collection(Serial.Name)]
public class StackedBasesTests
{
    private static readonly Device Dev = TestDevice.Current;
    private const long Hidden = 32, HeadDim = 8;

    /// <summary>A frozen Linear with a low-rank update (LoRA's forward: update in the input's dtype, one addmm).</summary>
    private sealed class Proj : nn.Module<Tensor, Tensor>, ILowRankLinear
    {
        public readonly Linear Linear;
        public readonly Parameter A, B;
        private readonly double s;

        public Proj(long outF, bool bias, ScalarType dtype, Generator gen) : base(nameof(Proj))
        {
            Linear = nn.Linear(Hidden, outF, hasBias: bias, device: Dev, dtype: dtype);
            using (no_grad())
            {
                Linear.weight!.copy_(randn([outF, Hidden], generator: gen) / Math.Sqrt(Hidden));
                Linear.bias?.copy_(randn([outF], generator: gen) * 0.1);
            }
            Linear.weight!.requires_grad = false;
            Linear.bias?.requires_grad_(false);
            A = new Parameter((randn([4, Hidden], generator: gen) / Math.Sqrt(Hidden)).to(Dev));
            B = new Parameter((randn([outF, 4], generator: gen) * 0.3).to(Dev));
            s = 0.5;
            RegisterComponents();
        }

        // DoRA-like row scales, when set: c itself (RowScale), or c = M/N with the divisor N (DividedRowScale).
        public Parameter? C, M;
        public Tensor? N;

        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            var y = Linear.call(x);
            var xa = nn.functional.linear(x, A.to(x.dtype));
            return torchx.addmm(y.reshape(-1, y.size(-1)), xa.reshape(-1, 4), B.to(x.dtype).t(), 1, s).view(y.shape).MoveToOuterDisposeScope();
        }

        public LowRankParts? low_rank_parts(out string reason)
        {
            reason = "";
            var parts = new LowRankParts(Linear.weight!, Linear.bias, A, B, s);
            if (C is { } c) return parts with { RowScale = () => c };
            if (M is not { } m) return parts;
            return parts with
            {
                RowScale = () => m.div(N!),
                DividedRowScale = () =>
                {
                    using var noGrad = no_grad();
                    return (m.div(N!), m, N!);
                },
            };
        }
    }

    private sealed class Block() : nn.Module("block");

    private static (Proj q, Proj k, Proj v) Make(ScalarType dtype, long kvHeads, bool bias, int seed = 3)
    {
        var gen = new Generator((ulong)seed);
        return (new Proj(4 * HeadDim, bias, dtype, gen), new Proj(kvHeads * HeadDim, bias, dtype, gen), new Proj(kvHeads * HeadDim, bias, dtype, gen));
    }

    private static LowRankParts[] Parts(params Proj[] projs) => projs.Select(p => p.low_rank_parts(out _)!).ToArray();

    // Every block stacked (on), or none (off: row-scaled blocks too, StackedBases.RowScaled).
    private static T WithStacked<T>(bool on, Func<T> f, bool stackForward = true)
    {
        var (was, forward, rowScaled, onCuda) = (StackedBases.Enabled, StackedBases.StackForward, StackedBases.RowScaled, StackedBases.OnCuda);
        (StackedBases.Enabled, StackedBases.StackForward, StackedBases.RowScaled, StackedBases.OnCuda) = (on, on && stackForward, on, on);
        try
        {
            return f();
        }
        finally
        {
            (StackedBases.Enabled, StackedBases.StackForward, StackedBases.RowScaled, StackedBases.OnCuda) = (was, forward, rowScaled, onCuda);
        }
    }

    private static bool BackToBack(params Tensor[] ts)
    {
        var p = torchx.data_ptr(ts[0]);
        foreach (var t in ts)
        {
            if (torchx.data_ptr(t) != p) return false;
            p += (nint)(t.size(0) * t.size(1) * t.element_size());
        }
        return true;
    }

    [Theory]
    [InlineData(ScalarType.Float32, true)]
    [InlineData(ScalarType.BFloat16, true)]
    [InlineData(ScalarType.BFloat16, false)]
    public void Rehoming_puts_the_weights_back_to_back_in_one_storage_with_their_values(ScalarType dtype, bool staged)
    {
        // Staged through host memory (CUDA's default; here on the CPU too) or the stack allocated beside the weights.
        var (stage, stageOnCpu) = (StackedBases.StageThroughHost, StackedBases.StageOnCpu);
        (StackedBases.StageThroughHost, StackedBases.StageOnCpu) = (staged, staged);
        try
        {
            WithStacked(true, () =>
            {
                Rehome(dtype);
                return 0;
            });
        }
        finally
        {
            (StackedBases.StageThroughHost, StackedBases.StageOnCpu) = (stage, stageOnCpu);
        }
    }

    private static void Rehome(ScalarType dtype)
    {
        var (q, k, v) = Make(dtype, 2, bias: false);
        using var qOwned = q;
        using var kOwned = k;
        using var vOwned = v;
        var weights = new[] { q.Linear.weight!, k.Linear.weight!, v.Linear.weight! };
        var before = weights.Select(w => w.detach().clone()).ToArray();
        var cuda = TestDevice.IsCuda && torchx.cuda.memory_stats_exact;
        if (cuda) torchx.cuda.synchronize();
        var allocated = cuda ? torchx.cuda.memory_allocated() : 0;
        var rehomes = StackedBases.Rehomes;

        using var stacked = WithStacked(true, () => StackedBases.Weight(Parts(q, k, v), rehome: true, out var why) ?? throw new Xunit.Sdk.XunitException(why));
        // Re-homed (three allocations are never one storage, even where an allocator placed them back to back).
        Assert.Equal(rehomes + 1, StackedBases.Rehomes);
        // The same Parameter objects, contiguous, back to back, values unchanged; the view is [Wq; Wk; Wv].
        Assert.Same(weights[0], q.Linear.weight);
        Assert.True(BackToBack(weights), "weights not back to back");
        Assert.All(weights, w => Assert.True(w.is_contiguous() && !w.requires_grad));
        for (var i = 0; i < 3; i++) Assert.True(Exact.Equal(weights[i], before[i]), $"weight {i} changed");
        Assert.Equal([(4 + 2 + 2) * HeadDim, Hidden], stacked.shape);
        Assert.True(Exact.Equal(stacked, cat(before, 0)));
        if (cuda)
        {
            // One new stack, the three old storages freed: no second copy.
            torchx.cuda.synchronize();
            var bytes = before.Sum(w => w.numel() * w.element_size());
            Assert.True(torchx.cuda.memory_allocated() - allocated < bytes / 2, "the weights' memory grew");
        }

        // Found stacked again: no second re-homing, same memory.
        var first = torchx.data_ptr(weights[0]);
        using var again = StackedBases.Weight(Parts(q, k, v), rehome: true, out _);
        Assert.NotNull(again);
        Assert.Equal(rehomes + 1, StackedBases.Rehomes);
        Assert.Equal(first, torchx.data_ptr(weights[0]));
        // Writes through a weight (a merge, a load by copy_) land in the stack.
        using (no_grad()) weights[1].add_(1);
        Assert.True(Exact.Equal(again!.narrow(0, 4 * HeadDim, 2 * HeadDim), before[1] + 1));
    }

    [Fact]
    public void Saved_files_and_loads_are_unchanged_by_rehoming()
    {
        var (q, k, v) = Make(ScalarType.BFloat16, 2, bias: true);
        using var qOwned = q;
        using var kOwned = k;
        using var vOwned = v;
        var dir = Directory.CreateTempSubdirectory("stacked-bases-");
        try
        {
            Dictionary<string, Tensor> State() => new()
            {
                ["q.weight"] = q.Linear.weight!, ["k.weight"] = k.Linear.weight!, ["v.weight"] = v.Linear.weight!, ["q.bias"] = q.Linear.bias!,
            };
            string Save(string name)
            {
                var path = Path.Combine(dir.FullName, name);
                torchx.save_safetensors(State(), path);
                return path;
            }
            var unstacked = Save("before.safetensors");
            using var w = WithStacked(true, () => StackedBases.Weight(Parts(q, k, v), rehome: true, out _));
            Assert.NotNull(w);
            var stacked = Save("after.safetensors");
            Assert.Equal(File.ReadAllBytes(unstacked), File.ReadAllBytes(stacked));

            // Loading by copy_ writes into the stack: still stacked, values from the file.
            using (no_grad()) foreach (var t in State().Values) t.zero_();
            torchx.load_safetensors_into(State(), unstacked);
            Assert.True(BackToBack(q.Linear.weight!, k.Linear.weight!, v.Linear.weight!));
            Assert.Equal(File.ReadAllBytes(unstacked), File.ReadAllBytes(Save("reloaded.safetensors")));
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    [Fact]
    public void Separated_weights_are_found_apart_and_rehomed_again()
    {
        var (q, k, v) = Make(ScalarType.Float32, 2, bias: false);
        using var qOwned = q;
        using var kOwned = k;
        using var vOwned = v;
        using var first = WithStacked(true, () => StackedBases.Weight(Parts(q, k, v), rehome: true, out _));
        Assert.NotNull(first);
        // A load that replaces a Parameter (or a move) separates it from the stack.
        var values = k.Linear.weight!.detach().clone();
        k.Linear.weight = new Parameter(values.clone(), requires_grad: false);
        WithStacked(true, () =>
        {
            Assert.Null(StackedBases.Weight(Parts(q, k, v), rehome: false, out var why));
            Assert.Equal("weights not in one storage", why);
            using var again = StackedBases.Weight(Parts(q, k, v), rehome: true, out why);
            Assert.Null(why);
            Assert.True(BackToBack(q.Linear.weight!, k.Linear.weight!, v.Linear.weight!));
            Assert.True(Exact.Equal(k.Linear.weight!, values));
            return 0;
        });
        // A module moved (here to fp64 and back) gets weights of its own: apart again, values kept, re-homed on request.
        var qValues = q.Linear.weight!.detach().clone();
        q.Linear.to(ScalarType.Float64);
        q.Linear.to(ScalarType.Float32);
        Assert.True(Exact.Equal(q.Linear.weight!, qValues));
        Assert.False(q.Linear.weight!.requires_grad);
        WithStacked(true, () =>
        {
            Assert.Null(StackedBases.Weight(Parts(q, k, v), rehome: false, out _));
            using var again = StackedBases.Weight(Parts(q, k, v), rehome: true, out var why);
            Assert.Null(why);
            Assert.True(BackToBack(q.Linear.weight!, k.Linear.weight!, v.Linear.weight!));
            Assert.True(Exact.Equal(q.Linear.weight!, qValues));
            return 0;
        });
        // Switched off: never stacked.
        Assert.Null(WithStacked(false, () => StackedBases.Weight(Parts(q, k, v), rehome: true, out _)));
    }

    [Fact]
    public void Bases_that_cannot_be_stacked_say_why_and_keep_their_memory()
    {
        var (q, k, v) = Make(ScalarType.Float32, 2, bias: false);
        using var qOwned = q;
        using var kOwned = k;
        using var vOwned = v;
        WithStacked(true, () =>
        {
            var parts = Parts(q, k, v);
            // A 4-bit base has no dense weight to stack.
            using var fourBit = Linear4bit.FromLinear(LinearLayer.From(k.Linear)!, Dev, "nf4", 32, double_quant: false, compute_dtype: ScalarType.Float32);
            var quantized = new[] { parts[0], LowRankParts.FromComputedWeight(fourBit, null, k.A, k.B, 0.5), parts[2] };
            Assert.Null(StackedBases.Weight(quantized, rehome: true, out var why));
            Assert.Equal("a computed (quantized) base", why);
            // Tied k and v: re-pointing one of them would lose the other.
            var tied = new[] { parts[0], parts[1], parts[1] with { } };
            var kBefore = torchx.data_ptr(k.Linear.weight!);
            Assert.Null(StackedBases.Weight(tied, rehome: true, out why));
            Assert.Equal("bases share memory", why);
            Assert.Equal(kBefore, torchx.data_ptr(k.Linear.weight!));
            // A weight that is no Parameter (computed per call) is not re-pointed.
            using var plain = q.Linear.weight!.detach().clone();
            Assert.Null(StackedBases.Weight([parts[0] with { Weight = plain }, parts[1], parts[2]], rehome: true, out why));
            Assert.Equal("a base that is not a Parameter", why);
            // A trainable base.
            k.Linear.weight!.requires_grad = true;
            Assert.Null(StackedBases.Weight(parts, rehome: true, out why));
            Assert.Equal("a trainable base", why);
            k.Linear.weight!.requires_grad = false;
            return 0;
        });
    }

    [Theory]
    [InlineData(ScalarType.Float32, 2, false, false, true)]
    [InlineData(ScalarType.Float32, 4, true, true, true)]
    [InlineData(ScalarType.BFloat16, 2, true, true, true)]
    [InlineData(ScalarType.BFloat16, 4, false, true, true)]
    [InlineData(ScalarType.BFloat16, 2, true, true, false)]
    [InlineData(ScalarType.Float32, 4, false, true, false)]
    public void Stacked_bases_give_the_unstacked_outputs_and_gradients(ScalarType dtype, long kvHeads, bool bias, bool adjacentGrads, bool stackForward)
    {
        // stackForward false (the default): the forward keeps one GEMM per base; the weights are re-homed all the same and
        // backward's dx is one GEMM.
        var (q, k, v) = Make(dtype, kvHeads, bias);
        using var qOwned = q;
        using var kOwned = k;
        using var vOwned = v;
        var block = new Block();
        var gen = new Generator(11);
        using var x0 = randn([2, 5, Hidden], generator: gen).to(dtype).to(Dev);
        long nq = 4 * HeadDim, nkv = kvHeads * HeadDim;
        // Upstream gradients as column slices of one buffer (as the rope kernel's backward gives them) or apart.
        using var g = randn([2, 5, nq + 2 * nkv], generator: gen).to(dtype).to(Dev);
        Tensor[] Upstream() => adjacentGrads
            ? [g.narrow(2, 0, nq), g.narrow(2, nq, nkv), g.narrow(2, nq + nkv, nkv)]
            : [g.narrow(2, 0, nq).contiguous(), g.narrow(2, nq, nkv).contiguous(), g.narrow(2, nq + nkv, nkv).contiguous()];
        var trainable = new[] { q.A, q.B, k.A, k.B, v.A, v.B };

        (Tensor[] outputs, Tensor dx, Tensor[] grads) Run(bool stacked) => WithStacked(stacked, () => FusedBlocksOn(() =>
        {
            foreach (var p in trainable) p.grad = null;
            var x = x0.detach().clone().requires_grad_(true);
            var (forward, backward) = (StackedBases.ForwardGemms, StackedBases.BackwardGemms);
            var (a, b, c) = LoraFusion.TryQkv(block, q, k, v, x, fused: true) ?? throw new Xunit.Sdk.XunitException(LoraFusionPaths.Of(block));
            Assert.Equal(forward + (stacked && stackForward ? 1 : 0), StackedBases.ForwardGemms);
            if (stacked) Assert.True(BackToBack(q.Linear.weight!, k.Linear.weight!, v.Linear.weight!));
            if (stacked && stackForward)
            {
                // The outputs are column slices of one (tokens, Nq + Nk + Nv) buffer.
                var es = a.element_size();
                Assert.Equal(torchx.data_ptr(a) + (nint)(nq * es), torchx.data_ptr(b));
                Assert.Equal(torchx.data_ptr(b) + (nint)(nkv * es), torchx.data_ptr(c));
                Assert.True(BackToBack(q.Linear.weight!, k.Linear.weight!, v.Linear.weight!));
            }
            torch.autograd.backward([a, b, c], Upstream());
            Assert.Equal(backward + (stacked && adjacentGrads ? 1 : 0), StackedBases.BackwardGemms);
            return (new[] { a, b, c }.Select(o => o.detach().clone()).ToArray(), x.grad!.detach().clone(),
                trainable.Select(p => p.grad!.detach().clone()).ToArray());
        }), stackForward);

        var three = Run(false);
        var one = Run(true);
        var (rtol, atol) = dtype == ScalarType.Float32 ? (1e-5, 1e-6) : (1e-2, 1e-2);
        for (var i = 0; i < 3; i++) FusedKernelTests.AssertClose(one.outputs[i], three.outputs[i], rtol, atol, $"output {i}");
        FusedKernelTests.AssertClose(one.dx, three.dx, rtol, atol, "dx");
        for (var i = 0; i < trainable.Length; i++) FusedKernelTests.AssertClose(one.grads[i], three.grads[i], rtol, atol, $"gradient {i}");
        // Without the stacked forward the outputs are the three GEMMs' own: bit for bit the unstacked ones.
        if (!stackForward) for (var i = 0; i < 3; i++) Assert.True(Exact.Equal(one.outputs[i], three.outputs[i]), $"output {i} bits");
    }

    [Theory]
    [InlineData(ScalarType.Float32, true)]
    [InlineData(ScalarType.BFloat16, true)]
    [InlineData(ScalarType.BFloat16, false)]
    public void Stacked_bases_with_row_scales_give_the_unstacked_outputs_and_gradients(ScalarType dtype, bool adjacentGrads)
    {
        // DoRA's shape: q scaled as c = m/n (the fused function takes m and divides dc by n), k plain with a bias (added by
        // the base GEMM), v scaled by c itself with a bias (added after the scale). On CUDA the three scales go in one pass
        // each way over the stacked output; elsewhere the bases are not stacked (the scales' kernel is CUDA's).
        var (q, k, v) = Make(dtype, 2, bias: true, seed: 8);
        using var qOwned = q;
        using var kOwned = k;
        using var vOwned = v;
        var gen = new Generator(12);
        q.M = new Parameter((rand([4 * HeadDim], generator: gen) + 0.5).to(Dev));
        q.N = (rand([4 * HeadDim], generator: gen) + 0.8).to(Dev);
        v.C = new Parameter((rand([2 * HeadDim], generator: gen) + 0.5).to(Dev));
        var block = new Block();
        using var x0 = randn([3, 7, Hidden], generator: gen).to(dtype).to(Dev);
        long nq = 4 * HeadDim, nkv = 2 * HeadDim;
        using var g = randn([3, 7, nq + 2 * nkv], generator: gen).to(dtype).to(Dev);
        Tensor[] Upstream() => adjacentGrads
            ? [g.narrow(2, 0, nq), g.narrow(2, nq, nkv), g.narrow(2, nq + nkv, nkv)]
            : [g.narrow(2, 0, nq).contiguous(), g.narrow(2, nq, nkv).contiguous(), g.narrow(2, nq + nkv, nkv).contiguous()];
        var trainable = new[] { q.A, q.B, k.A, k.B, v.A, v.B, q.M, v.C };
        var stacks = TestDevice.IsCuda;

        (Tensor[] outputs, Tensor dx, Tensor[] grads) Run(bool stacked) => WithStacked(stacked, () => FusedBlocksOn(() =>
        {
            foreach (var p in trainable) p.grad = null;
            var x = x0.detach().clone().requires_grad_(true);
            var (forward, backward) = (StackedBases.ForwardGemms, StackedBases.BackwardGemms);
            var (a, b, c) = LoraFusion.TryQkv(block, q, k, v, x, fused: true) ?? throw new Xunit.Sdk.XunitException(LoraFusionPaths.Of(block));
            Assert.Equal(forward + (stacked && stacks ? 1 : 0), StackedBases.ForwardGemms);
            torch.autograd.backward([a, b, c], Upstream());
            // The scales' backward leaves d(inner) as one buffer either way: dx is one GEMM.
            Assert.Equal(backward + (stacked && stacks ? 1 : 0), StackedBases.BackwardGemms);
            return (new[] { a, b, c }.Select(o => o.detach().clone()).ToArray(), x.grad!.detach().clone(),
                trainable.Select(p => p.grad!.detach().clone()).ToArray());
        }));

        var three = Run(false);
        var one = Run(true);
        if (!stacks) Assert.Contains("row scales without their CUDA kernel", WithStacked(true, () => StackedBases.Report));
        var (rtol, atol) = dtype == ScalarType.Float32 ? (1e-5, 1e-6) : (1e-2, 1e-2);
        for (var i = 0; i < 3; i++) FusedKernelTests.AssertClose(one.outputs[i], three.outputs[i], rtol, atol, $"output {i}");
        FusedKernelTests.AssertClose(one.dx, three.dx, rtol, atol, "dx");
        for (var i = 0; i < trainable.Length; i++) FusedKernelTests.AssertClose(one.grads[i], three.grads[i], rtol, atol, $"gradient {i}");
    }

    // Both fused blocks on (the CPU included), restored after.
    private static T FusedBlocksOn<T>(Func<T> f)
    {
        var (qkv, cpu) = (FX.Fused.LoraQkv, FX.Fused.LoraBlocksOnCpu);
        FX.Fused.LoraQkv = FX.Fused.LoraBlocksOnCpu = true;
        try
        {
            return f();
        }
        finally
        {
            (FX.Fused.LoraQkv, FX.Fused.LoraBlocksOnCpu) = (qkv, cpu);
        }
    }

    /// <summary>Identity on (q, k, v) whose backward records the gradients it receives (the rope kernel's input gradients).</summary>
    private sealed class Probe : CustomFunction
    {
        public (nint ptr, long[] strides)[] Seen = [];

        protected override string name => "probe";

        protected override Tensor[] forward(Tensor?[] inputs) => inputs.Select(t => t!.clone()).ToArray();

        protected override Tensor?[] backward(Tensor[] grad_outputs)
        {
            Seen = grad_outputs.Select(g => (torchx.data_ptr(g), g.stride())).ToArray();
            return grad_outputs.Select(g => g.clone()).ToArray();
        }
    }

    [Theory]
    [InlineData(2)]
    [InlineData(4)]
    public void Rope_backward_gives_adjacent_column_blocks_on_cuda(long kvHeads)
    {
        // The kernel runs on CUDA only; elsewhere the composite rope's gradients are separate tensors (one GEMM each).
        if (!TestDevice.IsCuda || !FX.rotary_embedding_gqa_is_fused(zeros([1, 4, 2, HeadDim], ScalarType.BFloat16, Dev),
                zeros([2, HeadDim], device: Dev), zeros([2, HeadDim], device: Dev)))
            return;
        var gen = new Generator(5);
        long b = 2, t = 6, heads = 4;
        using var scope = NewDisposeScope();
        var q = randn([b, heads, t, HeadDim], generator: gen).to(ScalarType.BFloat16).to(Dev).requires_grad_(true);
        var k = randn([b, kvHeads, t, HeadDim], generator: gen).to(ScalarType.BFloat16).to(Dev).requires_grad_(true);
        var v = randn([b, kvHeads, t, HeadDim], generator: gen).to(ScalarType.BFloat16).to(Dev).requires_grad_(true);
        var angles = randn([t, HeadDim], generator: gen).to(Dev);
        var probe = new Probe();
        // The one-buffer layout is the stacked bases' (the switch read in forward).
        WithStacked(true, () =>
        {
            var inner = probe.apply(q, k, v);
            var (qr, kr, vr) = FX.rotary_embedding_gqa(inner[0], inner[1], inner[2], angles.cos(), angles.sin());
            var loss = (qr.to(ScalarType.Float32) * randn(qr.shape, generator: gen).to(Dev)).sum() + (kr.to(ScalarType.Float32) * 2).sum() +
                       (vr.to(ScalarType.Float32) * 3).sum();
            loss.backward();
            return 0;
        });
        // dk (and dv, with a repeat) start where the previous block's columns end; token stride (Hq + 2·Hkv)·D (MHA: v
        // passes the kernel untouched, so q and k only).
        var withV = kvHeads != heads;
        var width = (heads + (withV ? 2 : 1) * kvHeads) * HeadDim;
        var seen = probe.Seen;
        Assert.Equal(3, seen.Length);
        Assert.Equal(seen[0].ptr + (nint)(heads * HeadDim * 2), seen[1].ptr);
        Assert.Equal(width, seen[0].strides[2]);
        Assert.Equal(width, seen[1].strides[2]);
        if (withV) Assert.Equal(seen[1].ptr + (nint)(kvHeads * HeadDim * 2), seen[2].ptr);
    }
}
