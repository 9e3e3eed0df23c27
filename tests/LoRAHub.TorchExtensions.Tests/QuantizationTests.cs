using LoRAHub.TorchExtensions.Cuda;
using LoRAHub.TorchExtensions.Modules;
using LoRAHub.TorchExtensions.Quantization;
using TorchSharp.Modules;

namespace LoRAHub.TorchExtensions.Tests;

using F = torch.nn.functional;

/// <summary>QLoRA's 4-bit formats against their published definitions, the dequantization kernel against the composite path, and Linear4bit.</summary>
[Collection(KernelTestsCollection.Name)]
public class QuantizationTests
{
    private static readonly Device Dev = TestDevice.Current;
    private static readonly Device Cuda = new(DeviceType.CUDA, 0);

    [Fact]
    public void Nf4_table_is_the_published_one()
    {
        float[] published =
        [
            -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
            -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
            0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
            0.7229568362236023f, 1.0f,
        ];
        Assert.Equal(published, QuantizationCodes.NF4);
        Assert.Equal(256, QuantizationCodes.Dynamic8.Length);
        Assert.Equal(1.0f, QuantizationCodes.Dynamic8[^1]);
        Assert.Equal(-0.99296875f, QuantizationCodes.Dynamic8[0], 6); // -(0.9859375 + 1) / 2: the last two points of linspace(0.1, 1, 65)
        Assert.Contains(0f, QuantizationCodes.Dynamic8);
    }

    [Fact]
    public void Known_inputs_quantize_to_the_nearest_code_and_pack_high_nibble_first()
    {
        using var scope = NewDisposeScope();
        var values = new float[64];
        values[0] = 2.0f;  // absmax 2 → 1.0 → code 15
        values[1] = -1.0f; // -0.5 → nearest -0.5251 → code 2
        values[2] = 0.5f;  // 0.25 → nearest 0.2461 → code 10
        values[3] = 0.1f;  // 0.05 → nearest 0.0796 → code 8
        var q = FourBit.Quantize(tensor(values, device: Dev), "nf4", 64, doubleQuant: false);
        var packed = q.Packed.cpu().data<byte>().ToArray();
        Assert.Equal(32, packed.Length);
        Assert.Equal(0xF2, packed[0]);
        Assert.Equal(0xA8, packed[1]);
        Assert.Equal(0x77, packed[2]); // zeros are code 7
        Assert.Equal(2.0f, q.Absmax!.cpu().item<float>());
        var back = q.Dequantize(ScalarType.Float32).cpu().data<float>().ToArray();
        Assert.Equal(2.0f, back[0]);
        Assert.Equal(-0.5250730514526367f * 2, back[1], 6);
        Assert.Equal(0.24611230194568634f * 2, back[2], 6);
        Assert.Equal(0.07958029955625534f * 2, back[3], 6);
        Assert.Equal(0f, back[4]);
    }

    [Fact]
    public void Error_on_normal_weights_is_within_half_the_largest_code_gap()
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(0);
        var w = randn([256, 512], device: Dev);
        var q = FourBit.Quantize(w, "nf4", 64, doubleQuant: false);
        var err = (q.Dequantize(ScalarType.Float32) - w).abs();
        var absmax = w.reshape(-1, 64).abs().amax([1], keepdim: true);
        // Nearest-code rounding: each error is at most half the widest gap between codes (−1 → −0.696), times absmax.
        var bound = absmax * ((1.0 - 0.6961928009986877) / 2 + 1e-6);
        Assert.True(err.reshape(-1, 64).le(bound).all().item<bool>());
        var mean = err.mean().item<float>();
        Assert.InRange(mean, 0.05, 0.11); // NF4 on N(0,1) with blocks of 64
    }

    [Fact]
    public void Double_quantization_changes_storage_as_predicted_and_error_only_slightly()
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(1);
        long n = 64 * 256 * 4;
        var w = randn([n / 512, 512], device: Dev);
        using var plain = FourBit.Quantize(w, "nf4", 64, doubleQuant: false);
        using var nested = FourBit.Quantize(w, "nf4", 64, doubleQuant: true);
        Assert.Equal(n / 2 + 4 * (n / 64), plain.StorageBytes);                 // 4.5 bits per weight
        Assert.Equal(n / 2 + n / 64 + 4 * (n / 64 / 256), nested.StorageBytes); // ≈ 4.127 bits per weight
        Assert.Equal(4.5, plain.StorageBytes * 8.0 / n, 6);
        Assert.Equal(4.127, nested.StorageBytes * 8.0 / n, 3);
        var e1 = (plain.Dequantize(ScalarType.Float32) - w).abs().mean().item<float>();
        var e2 = (nested.Dequantize(ScalarType.Float32) - w).abs().mean().item<float>();
        Assert.True(e2 < e1 * 1.01, $"double quantization error {e2} vs {e1}");
        var absmaxError = (nested.BlockAbsmax() - plain.Absmax!).abs().max().item<float>();
        Assert.True(absmaxError < 0.02f, $"absmax recovered within {absmaxError}");
    }

    [Fact]
    public void Fp4_round_trips_its_code_values_and_odd_sizes_pad()
    {
        using var scope = NewDisposeScope();
        var values = QuantizationCodes.FP4.Select(v => v * 3f).Concat(Enumerable.Repeat(0f, 5)).ToArray(); // 21 values: padded block
        var q = FourBit.Quantize(tensor(values, [3, 7], device: Dev), "fp4", 64, doubleQuant: false);
        var back = q.Dequantize(ScalarType.Float32);
        Assert.Equal(new long[] { 3, 7 }, back.shape);
        Assert.Equal(values, back.cpu().data<float>().ToArray());
        Assert.Equal(ScalarType.BFloat16, q.Dequantize(ScalarType.BFloat16).dtype);
        Assert.Throws<ArgumentException>(() => FourBit.Quantize(ones(4), "int3"));
    }

    // Bits of each value (fp32-widened: exact for fp16/bf16, and keeps the sign of zero).
    private static int[] Bits(Tensor t) => t.to(ScalarType.Float32).cpu().data<float>().ToArray().Select(BitConverter.SingleToInt32Bits).ToArray();

    [Fact]
    public void Cuda_kernel_matches_the_portable_path_bit_for_bit()
    {
        if (!cuda.is_available()) return;
        Assert.True(FourBit.HasCudaKernel, $"CUDA is available but LoRAHub's kernels are not: {CudaKernels.UnavailableReason}");
        using var scope = NewDisposeScope();
        torchx.manual_seed(3);
        // Vector path (sizes and blocks multiples of 8) and scalar path (odd size; blocksize 6 is no power of two).
        var cases = new (long[] shape, int blocksize)[] { ([96, 256], 64), ([5, 7], 64), ([33, 10], 6), ([1, 4096 * 3], 4096) };
        foreach (var (shape, blocksize) in cases)
            foreach (var type in FourBit.QuantTypes)
                foreach (var dq in new[] { false, true })
                {
                    var w = randn(shape, device: Cuda) * 0.05;
                    using var q = FourBit.Quantize(w, type, blocksize, dq);
                    foreach (var dtype in new[] { ScalarType.Float32, ScalarType.Float16, ScalarType.BFloat16 })
                    {
                        var before = CudaKernels.LaunchCount;
                        var kernel = q.Dequantize(dtype, DequantizeImpl.CudaKernel);
                        Assert.True(CudaKernels.LaunchCount > before, "the dequantization kernel did not run");
                        var portable = q.Dequantize(dtype, DequantizeImpl.Portable);
                        Assert.Equal(dtype, kernel.dtype);
                        Assert.Equal(shape, kernel.shape);
                        Assert.True(Bits(portable).SequenceEqual(Bits(kernel)),
                            $"kernel != portable for {type} dq={dq} {dtype} shape [{string.Join(", ", shape)}] blocksize {blocksize}");
                        Assert.True(Bits(q.Dequantize(dtype)).SequenceEqual(Bits(kernel)), "Auto should take the kernel on CUDA");
                    }
                }
    }

    [Fact]
    public void Kernel_request_for_a_cpu_weight_is_a_clear_error()
    {
        using var scope = NewDisposeScope();
        using var q = FourBit.Quantize(randn([4, 64]), "nf4", 64, doubleQuant: true);
        var e = Assert.ThrowsAny<TorchException>(() => q.Dequantize(ScalarType.BFloat16, DequantizeImpl.CudaKernel));
        Assert.Contains("CUDA", e.Message);
        // Auto falls back to the portable path on CPU.
        Assert.True(Bits(q.Dequantize(ScalarType.BFloat16)).SequenceEqual(Bits(q.Dequantize(ScalarType.BFloat16, DequantizeImpl.Portable))));
    }

    [Fact]
    public void Double_quantized_absmax_is_code_times_scale_plus_mean()
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(4);
        var w = randn([64, 64], device: Dev);
        using var q = FourBit.Quantize(w, "nf4", 64, doubleQuant: true);
        var codes = q.AbsmaxCodes!.cpu().data<byte>().ToArray();
        var scales = q.AbsmaxScales!.cpu().data<float>().ToArray();
        var absmax = q.BlockAbsmax().cpu().data<float>().ToArray();
        Assert.Equal(64, absmax.Length);
        Assert.Equal(256, codes.Length); // padded to one block of 256
        for (var i = 0; i < absmax.Length; i++)
            Assert.Equal((float)(QuantizationCodes.Dynamic8[codes[i]] * scales[0]) + (float)q.AbsmaxOffset, absmax[i]);
        // Every dequantized value is a code value times its block's absmax.
        var back = q.Dequantize(ScalarType.Float32, DequantizeImpl.Portable).cpu().data<float>().ToArray();
        var packed = q.Packed.cpu().data<byte>().ToArray();
        for (var i = 0; i < back.Length; i++)
        {
            var nibble = i % 2 == 0 ? packed[i / 2] >> 4 : packed[i / 2] & 15;
            Assert.Equal(QuantizationCodes.NF4[nibble] * absmax[i / 64], back[i]);
        }
    }

    [Fact]
    public void Bad_4bit_inputs_are_clear_errors()
    {
        using var scope = NewDisposeScope();
        Assert.Throws<ArgumentException>(() => FourBit.Quantize(ones(8), "nf4", 63));
        Assert.Throws<ArgumentException>(() => FourBit.Quantize(ones(8), "nf4", 0));
        Assert.Throws<ArgumentException>(() => FourBit.Quantize(ones([8], ScalarType.Int64), "nf4", 64));
    }

    // ---------------------------------------------------------------- Linear4bit

    private static ILinearLayer Dense(long inF, long outF, bool bias, long seed = 0)
    {
        torchx.manual_seed(seed);
        var l = torch.nn.Linear(inF, outF, bias, Dev, ScalarType.Float32);
        using var _ = no_grad();
        l.weight.normal_(0, 0.05);
        l.bias?.normal_(0, 0.05);
        return LinearLayer.From(l)!;
    }

    [Theory]
    [InlineData("nf4", true, ScalarType.Float32)]
    [InlineData("fp4", false, ScalarType.Float32)]
    [InlineData("nf4", true, ScalarType.BFloat16)]
    [InlineData("nf4", false, ScalarType.Float16)]
    public void Linear4bit_forward_equals_linear_with_the_dequantized_weight(string type, bool dq, ScalarType compute)
    {
        if (compute == ScalarType.Float16 && Dev.type != DeviceType.CUDA) return; // CPU libtorch has no fp16 matmul
        using var scope = NewDisposeScope();
        var dense = Dense(128, 96, bias: true);
        using var q = Linear4bit.FromLinear(dense, Dev, type, 64, dq, compute);
        torchx.manual_seed(5);
        var x = randn([3, 7, 128], device: Dev);
        var y = q.forward(x);
        Assert.Equal(ScalarType.Float32, y.dtype); // back in the input's dtype
        Assert.Equal(new long[] { 3, 7, 96 }, y.shape);
        var w = q.dense_weight();
        Assert.Equal(compute, w.dtype);
        var expected = (F.linear(x.to(compute), w) + q.bias!.to(compute)).to(ScalarType.Float32);
        Assert.True(Exact.Equal(y, expected), $"max diff {(y - expected).abs().max().item<float>()}");
        // The 4-bit layer approximates the dense one (relative error of NF4 ≈ 0.1, FP4 coarser).
        var denseOut = F.linear(x, dense.dense_weight(), dense.bias);
        var relative = (y - denseOut).pow(2).sum().sqrt().item<float>() / denseOut.pow(2).sum().sqrt().item<float>();
        Assert.True(relative < (type == "nf4" ? 0.15 : 0.3), $"relative error {relative}");
    }

    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    public void Linear4bit_input_and_bias_gradients_equal_the_dense_ones(ScalarType compute)
    {
        using var scope = NewDisposeScope();
        var dense = Dense(64, 48, bias: true, seed: 1);
        using var q = Linear4bit.FromLinear(dense, Dev, "nf4", 64, true, compute);
        q.bias!.requires_grad = true;
        torchx.manual_seed(6);
        var x = randn([5, 64], device: Dev).requires_grad_();
        var g = randn([5, 48], device: Dev);
        (q.forward(x) * g).sum().backward();

        var w = q.dense_weight().detach();
        var b = q.bias.detach().clone().requires_grad_();
        var xd = x.detach().clone().requires_grad_();
        ((F.linear(xd.to(compute), w) + b.to(compute)).to(ScalarType.Float32) * g).sum().backward();
        Assert.True(Exact.Equal(x.grad!, xd.grad!), $"input grad differs by {(x.grad! - xd.grad!).abs().max().item<float>()}");
        Assert.True(q.bias.grad!.allclose(b.grad!, 1e-5, 1e-5));
    }

    [Fact]
    public void Linear4bit_buffers_sizes_and_interface()
    {
        using var scope = NewDisposeScope();
        var dense = Dense(256, 64, bias: false);
        using var plain = Linear4bit.FromLinear(dense, Dev, "nf4", 64, double_quant: false, ScalarType.BFloat16);
        using var nested = Linear4bit.FromLinear(dense, Dev, "nf4", 64, double_quant: true, ScalarType.BFloat16);
        long n = 256 * 64;
        Assert.Equal(4.5, plain.weight_bytes * 8.0 / n, 6);
        Assert.Equal(n / 2 + n / 64 + 4 * (n / 64 / 256), nested.weight_bytes); // ≈ 4.127 bits per weight
        Assert.Equal(["weight", "absmax", "quant_map"], plain.named_buffers().Select(b => b.name));
        Assert.Equal(["weight", "absmax", "nested_absmax", "quant_map", "nested_quant_map"], nested.named_buffers().Select(b => b.name));
        Assert.Empty(nested.parameters());
        ILinearLayer l = nested;
        Assert.Equal(256, l.in_features);
        Assert.Equal(64, l.out_features);
        Assert.Equal(ScalarType.BFloat16, l.weight_dtype);
        Assert.Equal(Dev.type, l.weight_device.type);
        Assert.Equal(Math.Max(Dev.index, 0), Math.Max(l.weight_device.index, 0)); // "cuda" is device 0
        Assert.Equal(ScalarType.Byte, nested.named_buffers().First().buffer.dtype);
    }

    [Fact]
    public void Linear4bit_add_to_weight_requantizes_the_sum_in_place()
    {
        using var scope = NewDisposeScope();
        var dense = Dense(64, 64, bias: false, seed: 2);
        using var q = Linear4bit.FromLinear(dense, Dev, "nf4", 64, true, ScalarType.Float32);
        var before = q.dense_weight();
        var packed = q.named_buffers().First().buffer;
        var delta = full([64, 64], 0.01, device: Dev);
        q.add_to_weight_(delta);
        Assert.Same(packed, q.named_buffers().First().buffer); // same buffer tensors, new contents
        var after = q.dense_weight();
        var err = (after - (before + delta)).abs().max().item<float>();
        Assert.True(err < 0.05, $"requantized sum off by {err}");
        Assert.False(Exact.Equal(after, before));
        Assert.Throws<ArgumentException>(() => q.add_to_weight_(ones([2, 2], device: Dev)));
    }

    [Fact]
    public void Linear4bit_to_dtype_keeps_the_quantization_and_converts_the_bias()
    {
        using var scope = NewDisposeScope();
        var dense = Dense(64, 16, bias: true, seed: 3);
        using var q = Linear4bit.FromLinear(dense, Dev, "nf4", 64, true, ScalarType.Float32);
        var x = randn([2, 64], device: Dev);
        var w = q.dense_weight().clone();
        q.to(ScalarType.Float64);
        Assert.Equal(ScalarType.Float64, q.bias!.dtype);
        Assert.Equal(ScalarType.Float32, q.named_buffers().Single(b => b.name == "quant_map").buffer.dtype);
        Assert.True(Exact.Equal(q.dense_weight(), w));
        Assert.Equal(ScalarType.Float32, q.forward(x).dtype);
    }

    [Fact]
    public void Linear4bit_bad_inputs_are_clear_errors()
    {
        using var scope = NewDisposeScope();
        var dense = Dense(64, 8, bias: false);
        using var q = Linear4bit.FromLinear(dense, Dev, "nf4", 64, true, ScalarType.Float32);
        var e = Assert.ThrowsAny<TorchException>(() => q.forward(randn([2, 32], device: Dev)));
        Assert.Contains("64 features", e.Message);
        Assert.Throws<ArgumentException>(() => Linear4bit.FromLinear(dense, Dev, "int4"));
        Assert.Throws<ArgumentException>(() => new Linear4bit(FourBit.Quantize(ones([64]), "nf4", 64)));
        if (Dev.type == DeviceType.CUDA)
        {
            var wrong = Assert.ThrowsAny<TorchException>(() => q.forward(randn([2, 64])));
            Assert.Contains("cuda", wrong.Message);
        }
    }

    [Fact]
    public void Linear4bit_moves_to_cuda_with_all_its_buffers()
    {
        if (!cuda.is_available()) return;
        using var scope = NewDisposeScope();
        var dense = Dense(64, 32, bias: true, seed: 4);
        using var q = Linear4bit.FromLinear(dense, CPU, "nf4", 64, true, ScalarType.BFloat16);
        var cpuWeight = q.dense_weight();
        q.to(Cuda);
        Assert.All(q.named_buffers(), b => Assert.Equal(DeviceType.CUDA, b.buffer.device_type));
        Assert.Equal(DeviceType.CUDA, q.bias!.device_type);
        Assert.True(Exact.Equal(q.dense_weight().cpu(), cpuWeight));
        var y = q.forward(randn([3, 64], device: Cuda));
        Assert.Equal(new long[] { 3, 32 }, y.shape);
    }

    [Fact]
    public void Linear4bit_autograd_keeps_no_dequantized_weight_on_cuda()
    {
        // Exact allocation figures need CUDA with PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync (see torchx.cuda): the
        // caching allocator's used-memory figure would not see a weight kept alive in a block it already holds.
        if (Dev.type != DeviceType.CUDA || !torchx.cuda.memory_stats_exact) return;
        using var scope = torch.NewDisposeScope();
        var dense = Dense(4096, 6144, bias: false);
        using var q = Linear4bit.FromLinear(dense, Dev, "nf4", 64, true, ScalarType.BFloat16);
        var x = torch.randn([8, 4096], ScalarType.BFloat16, Dev).requires_grad_();
        // Warm-up on this thread: cuBLAS takes its workspace (32 MiB on Hopper) from the caching allocator per handle.
        using (var warm = torch.NewDisposeScope()) q.forward(x).sum().backward();
        x.grad = null;
        torchx.cuda.synchronize();
        var before = torchx.cuda.memory_allocated();
        var y = q.forward(x);
        torchx.cuda.synchronize();
        var kept = torchx.cuda.memory_allocated() - before;
        var denseBytes = 6144L * 4096 * 2;
        Assert.True(kept < denseBytes / 4, $"forward kept {kept} bytes alive (a dense bf16 weight is {denseBytes})");
        y.sum().backward();
        Assert.NotNull(x.grad);
    }
}
