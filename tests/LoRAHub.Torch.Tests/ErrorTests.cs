namespace LoRAHub.Torch.Tests;

/// <summary>Bad input raises typed .NET exceptions carrying libtorch's message; the process lives on.</summary>
public class ErrorTests
{
    [Fact]
    public void Shape_mismatch_raises_with_libtorch_message()
    {
        using var scope = torch.NewDisposeScope();
        var a = torch.ones(2, 3);
        var b = torch.ones(4, 5);
        var e = Assert.ThrowsAny<TorchException>(() => a.matmul(b));
        Assert.Contains("2x3", e.Message);
        Assert.Contains("4x5", e.Message);
        // The binding still works afterwards.
        Assert.Equal(6f, a.sum().item<float>());
    }

    [Fact]
    public void Broadcast_error_index_error_and_view_error()
    {
        using var scope = torch.NewDisposeScope();
        Assert.ThrowsAny<TorchException>(() => torch.ones(3) + torch.ones(4));
        var ie = Assert.ThrowsAny<TorchException>(() => torch.ones(3).select(0, 7));
        Assert.Equal(TorchErrorKind.Index, ie.Kind);
        Assert.ThrowsAny<TorchException>(() => torch.ones(6).view(4, 2));
        Assert.ThrowsAny<TorchException>(() => torch.ones(2).transpose(0, 3));
        Assert.ThrowsAny<TorchException>(() => torch.nn.functional.embedding(torch.tensor(new long[] { 9 }), torch.ones(3, 2)));
        Assert.ThrowsAny<TorchException>(() => torch.nn.functional.cross_entropy(torch.ones(2, 3), torch.tensor(new long[] { 0, 5 })));
    }

    [Fact]
    public void Backward_on_a_tensor_without_grad_raises()
    {
        using var scope = torch.NewDisposeScope();
        var e = Assert.ThrowsAny<TorchException>(() => torch.ones(2).sum().backward());
        Assert.Contains("grad", e.Message);
    }

    [Fact]
    public void Bad_buffer_sizes_and_devices_raise_argument_errors()
    {
        using var scope = torch.NewDisposeScope();
        var e = Assert.ThrowsAny<TorchException>(() => torch.frombuffer(new byte[7], [2], ScalarType.Float32));
        Assert.Equal(TorchErrorKind.Argument, e.Kind);
        Assert.Contains("7 bytes", e.Message);
        Assert.Throws<ArgumentException>(() => Device.Parse("tpu"));
        Assert.Throws<ArgumentException>(() => torch.ones(2).CopyTo(new byte[3]));
        Assert.Throws<ArgumentException>(() => torch.ones(2).data<long>());
    }

    [Fact]
    public void Using_a_disposed_tensor_raises_instead_of_crashing()
    {
        var t = torch.ones(2);
        t.Dispose();
        Assert.Throws<ObjectDisposedException>(() => t.sum());
        Assert.True(t.IsInvalid);
        t.Dispose(); // twice is fine
    }

    [Fact]
    public void Cuda_calls_without_cuda_raise_clear_errors()
    {
        if (torch.cuda.is_available()) return; // covered by the CUDA run
        var e = Assert.ThrowsAny<Exception>(() => torch.ones(2).cuda());
        Assert.False(string.IsNullOrWhiteSpace(e.Message));
    }
}
