using LoRAHub.TorchExtensions.Cuda;
using Xunit;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>
/// Our CUDA streams bind the driver on first use: a stream asked for before anything read
/// <see cref="CudaStreams.UnavailableReason"/> is made (CUDA) or refused with the reason (no driver), never a call through
/// an unbound function pointer (session 16: the first CublasTests run crashed the test host so).
/// </summary>
public class CudaStreamsTests
{
    [Fact]
    public void A_stream_is_made_or_refused_with_the_reason_on_first_use()
    {
        var stream = IntPtr.Zero;
        TorchException? refused = null;
        try
        {
            stream = CudaStreams.ComputeStream(0);
        }
        catch (TorchException e)
        {
            refused = e;
        }
        if (CudaStreams.UnavailableReason is { } why)
        {
            Assert.NotNull(refused);
            Assert.Contains(why, refused!.Message);
        }
        else
        {
            Assert.Null(refused);
            Assert.NotEqual(IntPtr.Zero, stream);
        }
    }
}
