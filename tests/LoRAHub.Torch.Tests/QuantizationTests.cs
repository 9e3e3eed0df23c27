using LoRAHub.Torch.Quantization;

namespace LoRAHub.Torch.Tests;

/// <summary>QLoRA's 4-bit formats against their published definitions.</summary>
public class QuantizationTests
{
    private static readonly Device Dev = TestDevice.Current;

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
        using var scope = torch.NewDisposeScope();
        var values = new float[64];
        values[0] = 2.0f;   // absmax 2 → 1.0 → code 15
        values[1] = -1.0f;  // -0.5 → nearest -0.5251 → code 2
        values[2] = 0.5f;   // 0.25 → nearest 0.2461 → code 10
        values[3] = 0.1f;   // 0.05 → nearest 0.0796 → code 8
        var q = FourBit.Quantize(torch.tensor(values, device: Dev), "nf4", 64, doubleQuant: false);
        var packed = q.Packed.cpu().data<byte>();
        Assert.Equal(32, packed.Length);
        Assert.Equal(0xF2, packed[0]);
        Assert.Equal(0xA8, packed[1]);
        Assert.Equal(0x77, packed[2]); // zeros are code 7
        Assert.Equal(2.0f, q.Absmax!.cpu().item<float>());
        var back = q.Dequantize(ScalarType.Float32).cpu().data<float>();
        Assert.Equal(2.0f, back[0]);
        Assert.Equal(-0.5250730514526367f * 2, back[1], 6);
        Assert.Equal(0.24611230194568634f * 2, back[2], 6);
        Assert.Equal(0.07958029955625534f * 2, back[3], 6);
        Assert.Equal(0f, back[4]);
    }

    [Fact]
    public void Error_on_normal_weights_is_within_half_the_largest_code_gap()
    {
        using var scope = torch.NewDisposeScope();
        torch.manual_seed(0);
        var w = torch.randn([256, 512], device: Dev);
        var q = FourBit.Quantize(w, "nf4", 64, doubleQuant: false);
        var err = (q.Dequantize(ScalarType.Float32) - w).abs();
        var absmax = w.reshape(-1, 64).abs().amax(1, keepdim: true);
        // Nearest-code rounding: each error is at most half the widest gap between codes (−1 → −0.696), times absmax.
        var bound = absmax * ((1.0 - 0.6961928009986877) / 2 + 1e-6);
        Assert.True(err.reshape(-1, 64).le(bound).all().item<bool>());
        var mean = err.mean().item<double>();
        Assert.InRange(mean, 0.05, 0.11); // NF4 on N(0,1) with blocks of 64
    }

    [Fact]
    public void Double_quantization_changes_storage_as_predicted_and_error_only_slightly()
    {
        using var scope = torch.NewDisposeScope();
        torch.manual_seed(1);
        long n = 64 * 256 * 4;
        var w = torch.randn([n / 512, 512], device: Dev);
        using var plain = FourBit.Quantize(w, "nf4", 64, doubleQuant: false);
        using var nested = FourBit.Quantize(w, "nf4", 64, doubleQuant: true);
        Assert.Equal(n / 2 + 4 * (n / 64), plain.StorageBytes);                       // 4.5 bits per weight
        Assert.Equal(n / 2 + n / 64 + 4 * (n / 64 / 256), nested.StorageBytes);       // ≈ 4.127 bits per weight
        Assert.Equal(4.5, plain.StorageBytes * 8.0 / n, 6);
        Assert.Equal(4.127, nested.StorageBytes * 8.0 / n, 3);
        var e1 = (plain.Dequantize(ScalarType.Float32) - w).abs().mean().item<double>();
        var e2 = (nested.Dequantize(ScalarType.Float32) - w).abs().mean().item<double>();
        Assert.True(e2 < e1 * 1.01, $"double quantization error {e2} vs {e1}");
        var absmaxError = (nested.BlockAbsmax() - plain.Absmax!).abs().max().item<float>();
        Assert.True(absmaxError < 0.02f, $"absmax recovered within {absmaxError}");
    }

    [Fact]
    public void Fp4_round_trips_its_code_values_and_odd_sizes_pad()
    {
        using var scope = torch.NewDisposeScope();
        var values = QuantizationCodes.FP4.Select(v => v * 3f).Concat(Enumerable.Repeat(0f, 5)).ToArray(); // 21 values: padded block
        var q = FourBit.Quantize(torch.tensor(values, [3, 7], Dev), "fp4", 64, doubleQuant: false);
        var back = q.Dequantize(ScalarType.Float32);
        Assert.Equal(new long[] { 3, 7 }, back.shape);
        Assert.Equal(values, back.cpu().data<float>());
        Assert.Equal(ScalarType.BFloat16, q.Dequantize(ScalarType.BFloat16).dtype);
        Assert.Throws<ArgumentException>(() => FourBit.Quantize(torch.ones(4), "int3"));
    }
    // Bits of each value (fp32-widened: exact for fp16/bf16, and keeps the sign of zero).
    private static int[] Bits(Tensor t) => t.to(ScalarType.Float32).cpu().data<float>().Select(BitConverter.SingleToInt32Bits).ToArray();

    [Fact]
    public void Cuda_kernel_matches_the_portable_path_bit_for_bit()
    {
        if (!TestDevice.IsCuda) return; // the kernel exists only in a CUDA build (run with LORAHUB_TEST_DEVICE=cuda)
        Assert.True(FourBit.HasCudaKernel, "the native library was built without the CUDA kernels");
        using var scope = torch.NewDisposeScope();
        torch.manual_seed(3);
        // Vector path (sizes and blocks multiples of 8) and scalar path (odd size; blocksize 6 is no power of two).
        var cases = new (long[] shape, int blocksize)[] { ([96, 256], 64), ([5, 7], 64), ([33, 10], 6), ([1, 4096 * 3], 4096) };
        foreach (var (shape, blocksize) in cases)
            foreach (var type in FourBit.QuantTypes)
                foreach (var dq in new[] { false, true })
                {
                    var w = torch.randn(shape, device: Dev) * 0.05;
                    using var q = FourBit.Quantize(w, type, blocksize, dq);
                    foreach (var dtype in new[] { ScalarType.Float32, ScalarType.Float16, ScalarType.BFloat16 })
                    {
                        var kernel = q.Dequantize(dtype, DequantizeImpl.CudaKernel);
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
    public void Kernel_request_without_cuda_is_a_clear_error()
    {
        if (TestDevice.IsCuda) return;
        using var scope = torch.NewDisposeScope();
        using var q = FourBit.Quantize(torch.randn([4, 64]), "nf4", 64, doubleQuant: true);
        var e = Assert.ThrowsAny<TorchException>(() => q.Dequantize(ScalarType.BFloat16, DequantizeImpl.CudaKernel));
        Assert.Contains("CUDA", e.Message);
        // Auto falls back to the portable path on CPU.
        Assert.True(Bits(q.Dequantize(ScalarType.BFloat16)).SequenceEqual(Bits(q.Dequantize(ScalarType.BFloat16, DequantizeImpl.Portable))));
    }

    [Fact]
    public void Double_quantized_absmax_is_code_times_scale_plus_mean()
    {
        using var scope = torch.NewDisposeScope();
        torch.manual_seed(4);
        var w = torch.randn([64, 64], device: Dev);
        using var q = FourBit.Quantize(w, "nf4", 64, doubleQuant: true);
        var codes = q.AbsmaxCodes!.cpu().data<byte>();
        var scales = q.AbsmaxScales!.cpu().data<float>();
        var absmax = q.BlockAbsmax().cpu().data<float>();
        Assert.Equal(64, absmax.Length);
        Assert.Equal(256, codes.Length); // padded to one block of 256
        for (var i = 0; i < absmax.Length; i++)
            Assert.Equal((float)(QuantizationCodes.Dynamic8[codes[i]] * scales[0]) + (float)q.AbsmaxOffset, absmax[i]);
        // Every dequantized value is a code value times its block's absmax.
        var back = q.Dequantize(ScalarType.Float32, DequantizeImpl.Portable).cpu().data<float>();
        var packed = q.Packed.cpu().data<byte>();
        for (var i = 0; i < back.Length; i++)
        {
            var nibble = i % 2 == 0 ? packed[i / 2] >> 4 : packed[i / 2] & 15;
            Assert.Equal(QuantizationCodes.NF4[nibble] * absmax[i / 64], back[i]);
        }
    }

    [Fact]
    public void Bad_4bit_inputs_are_clear_errors()
    {
        using var scope = torch.NewDisposeScope();
        Assert.Throws<ArgumentException>(() => FourBit.Quantize(torch.ones(8), "nf4", 63));
        Assert.Throws<ArgumentException>(() => FourBit.Quantize(torch.ones(8), "nf4", 0));
        Assert.Throws<ArgumentException>(() => FourBit.Quantize(torch.ones([8], ScalarType.Int64), "nf4", 64));
    }
}
