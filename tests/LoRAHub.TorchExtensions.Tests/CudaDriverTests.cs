using LoRAHub.TorchExtensions.Cuda;
using Xunit;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>
/// The driver binding binds on first use: entering a device's context or reading an attribute before anything asked
/// <see cref="CudaDriver.EnsureLoaded"/> works (CUDA) or is refused with the reason (no driver or no GPU), never a call
/// through an unbound function pointer.
/// </summary>
public class CudaDriverTests
{
    [Fact]
    public void A_context_or_attribute_is_had_or_refused_with_the_reason_on_first_use()
    {
        TorchException? refused = null;
        var processors = 0;
        try
        {
            using (CudaDriver.OnDevice(0)) processors = CudaDriver.Attribute(0, CudaDriver.AttrMultiprocessorCount);
        }
        catch (TorchException e)
        {
            refused = e;
        }
        if (CudaDriver.EnsureLoaded() is { } why)
        {
            Assert.NotNull(refused);
            Assert.Contains(why, refused!.Message);
        }
        else
        {
            Assert.Null(refused);
            Assert.True(processors > 0);
        }
    }
}
