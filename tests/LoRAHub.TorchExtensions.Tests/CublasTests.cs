using LoRAHub.TorchExtensions.Cuda;
using Xunit;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>
/// The cuBLAS binding (CUDA only): its version (also in `loraHub info`), and a batched bf16 × bf16 → fp32 GEMM through
/// device pointer arrays, in cuBLAS's column-major convention, against the same products by torch in fp64, on
/// libtorch's stream and on a side stream.
/// </summary>
public class CublasTests
{
    [Fact]
    public void A_batched_mixed_precision_gemm_matches_torch()
    {
        if (!cuda.is_available()) return;
        Assert.Null(Cublas.UnavailableReason);
        Assert.Matches(@"^\d+\.\d+\.\d+$", Cublas.Version);
        Assert.Contains($"cuBLAS {Cublas.Version}", CudaKernels.Describe());
        using var scope = NewDisposeScope();
        var dev = new Device(DeviceType.CUDA, 0);
        torchx.manual_seed(3);
        const int batch = 3, rows = 200, cols = 96, n = 10;
        // Row-major W_i (rows × cols) and X_i (n × cols); P_i = W_i·X_iᵀ (rows × n, row-major) is, column-major, the
        // n × rows product op(X)·W read as cols × n (transposed) and cols × rows.
        var w = Enumerable.Range(0, batch).Select(_ => randn([rows, cols], ScalarType.Float32, dev).to(ScalarType.BFloat16)).ToList();
        var x = Enumerable.Range(0, batch).Select(_ => randn([n, cols], ScalarType.Float32, dev).to(ScalarType.BFloat16)).ToList();
        foreach (var stream in new[] { CudaDriver.LegacyStream, CudaStreams.ComputeStream(0) })
        {
            var p = Enumerable.Range(0, batch).Select(_ => full([rows, n], -1f, ScalarType.Float32, dev)).ToList();
            long[] Pointers(IEnumerable<Tensor> ts) => ts.Select(t => (long)torchx.data_ptr(t)).ToArray();
            var arrays = tensor(Pointers(x).Concat(Pointers(w)).Concat(Pointers(p)).ToArray()).to(dev);
            var at = torchx.data_ptr(arrays);
            if (stream != CudaDriver.LegacyStream) CudaStreams.After(0, stream, CudaDriver.LegacyStream);
            Assert.True(Cublas.GemmBatched(0, stream, Cublas.OpT, Cublas.OpN, n, rows, cols, at, Cublas.R16BF, cols, at + batch * 8, Cublas.R16BF,
                cols, at + 2 * batch * 8, Cublas.R32F, n, batch));
            if (stream != CudaDriver.LegacyStream)
            {
                var done = CudaStreams.RecordEvent(0, stream);
                CudaStreams.Wait(0, CudaDriver.LegacyStream, done);
                CudaStreams.DestroyEvent(0, done);
            }
            for (var i = 0; i < batch; i++)
            {
                var expected = w[i].to(ScalarType.Float64).matmul(x[i].to(ScalarType.Float64).t());
                var off = p[i].to(ScalarType.Float64).sub(expected).abs().max().item<double>() / expected.abs().max().item<double>();
                Assert.True(off < 1e-6, $"matrix {i}: {off} off the fp64 product");
            }
        }
    }
}
