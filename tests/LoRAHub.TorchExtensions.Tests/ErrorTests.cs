using System.Runtime.InteropServices;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>Bad input raises typed .NET exceptions carrying libtorch's message; the process lives on.</summary>
public class ErrorTests
{
    [Fact]
    public void Shape_mismatch_raises_with_libtorch_message()
    {
        using var scope = NewDisposeScope();
        var a = ones(2, 3);
        var b = ones(4, 5);
        // Not a.matmul(b): TorchSharp 0.107's native matmul lets the C++ exception escape and the process aborts.
        var e = Assert.ThrowsAny<TorchException>(() => torchx.matmul(a, b));
        Assert.Contains("2x3", e.Message);
        Assert.Contains("4x5", e.Message);
        Assert.ThrowsAny<TorchException>(() => torchx.matmul(ones(2, 3), ones(3, 2, ScalarType.Float64)));
        Assert.ThrowsAny<TorchException>(() => torchx.matmul(ones(5, 2, 3), ones(4, 3, 2)));
        Assert.ThrowsAny<TorchException>(() => torchx.matmul(ones(3), ones(4)));
        var m = Assert.ThrowsAny<TorchException>(() => torchx.Guard(() => a.mm(b)));
        Assert.Contains("2x3", m.Message);
        Assert.IsAssignableFrom<ExternalException>(e.InnerException);
        Assert.DoesNotContain("frame #", e.Message); // libtorch's C++ backtrace is cut
        // libtorch still works afterwards.
        Assert.Equal(6f, a.sum().item<float>());
    }

    [Fact]
    public void Broadcast_error_index_error_and_view_error()
    {
        using var scope = NewDisposeScope();
        Assert.ThrowsAny<TorchException>(() => torchx.Guard(() => ones(3) + ones(4)));
        var ie = Assert.ThrowsAny<TorchException>(() => torchx.Guard(() => ones(3).select(0, 7)));
        Assert.Equal(TorchErrorKind.Index, ie.Kind);
        Assert.ThrowsAny<TorchException>(() => torchx.Guard(() => ones(6).view(4, 2)));
        Assert.ThrowsAny<TorchException>(() => torchx.Guard(() => ones(2).transpose(0, 3)));
        Assert.ThrowsAny<TorchException>(() => torchx.Guard(() => ones(3, 2).index_select(0, tensor(new long[] { 9 }))));
        Assert.ThrowsAny<TorchException>(() => torchx.Guard(() => nn.functional.cross_entropy(ones(2, 3), tensor(new long[] { 0, 5 }))));
    }

    [Fact]
    public void Backward_on_a_tensor_without_grad_raises()
    {
        using var scope = NewDisposeScope();
        var e = Assert.ThrowsAny<TorchException>(() => torchx.Guard(() => ones(2).sum().backward()));
        Assert.Contains("grad", e.Message);
    }

    [Fact]
    public void Out_of_memory_is_typed_and_says_what_to_reduce()
    {
        using var scope = NewDisposeScope();
        var device = TestDevice.Current;
        // 2^50 floats (4 PiB) on the test device: the allocator refuses, nothing aborts.
        var e = Assert.Throws<OutOfMemoryTorchException>(() => torchx.Guard(() => empty([1L << 50], ScalarType.Float32, device)));
        Assert.Equal(TorchErrorKind.OutOfMemory, e.Kind);
        Assert.Contains("batch size", e.Message);
        Assert.Contains("checkpointing", e.Message);
        Assert.Equal(3f, ones(3, device: device).sum().item<float>());
    }

    [Fact]
    public void Translate_leaves_other_exceptions_alone_and_classifies_libtorch_messages()
    {
        var io = new IOException("disk");
        Assert.Same(io, TorchErrors.Translate(io));
        Assert.Equal(TorchErrorKind.OutOfMemory, TorchErrors.Classify("CUDA out of memory. Tried to allocate 2.00 GiB"));
        Assert.Equal(TorchErrorKind.Index, TorchErrors.Classify("index 7 is out of bounds for dimension 0 with size 3"));
        Assert.Equal(TorchErrorKind.NotImplemented, TorchErrors.Classify("\"addmm_impl_cpu_\" not implemented for 'Half'"));
        Assert.Equal(TorchErrorKind.Generic, TorchErrors.Classify("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"));
        var typed = TorchErrors.Translate(new ExternalException("CUDA out of memory. Tried to allocate 20.00 GiB"));
        Assert.IsType<OutOfMemoryTorchException>(typed);
        Assert.Equal(42, torchx.Guard(() => 42));
    }

    [Fact]
    public void Bad_buffer_sizes_raise_argument_errors()
    {
        using var scope = NewDisposeScope();
        var e = Assert.Throws<ArgumentException>(() => torchx.frombuffer(new byte[7], [2], ScalarType.Float32));
        Assert.Contains("7 bytes", e.Message);
    }

    [Fact]
    public void Using_a_disposed_tensor_raises_instead_of_crashing()
    {
        var t = ones(2);
        t.Dispose();
        Assert.ThrowsAny<InvalidOperationException>(() => t.sum());
        Assert.True(t.IsInvalid);
        t.Dispose(); // twice is fine
    }

    [Fact]
    public void Cuda_calls_without_cuda_raise_clear_errors()
    {
        if (torch.cuda.is_available()) return; // covered by the CUDA run
        var e = Assert.ThrowsAny<Exception>(() => ones(2).cuda());
        Assert.False(string.IsNullOrWhiteSpace(e.Message));
    }
}
