using LoRAHub.TorchExtensions.Cuda;
using Xunit;

namespace LoRAHub.TorchExtensions.Tests;

public class KernelArgsTests
{
    [Fact]
    public void Slots_grow_past_32_up_to_the_cap_and_keep_their_values()
    {
        var args = new KernelArgs();
        for (var i = 0; i < KernelArgs.MaxCount; i++) args.I64(1000 + i);
        Assert.Equal(KernelArgs.MaxCount, args.Count);
        for (var i = 0; i < KernelArgs.MaxCount; i++) Assert.Equal((ulong)(1000 + i), args.Values[i]);
        var error = Assert.Throws<ArgumentException>(() => args.I32(1));
        Assert.Contains($"at most {KernelArgs.MaxCount} arguments", error.Message);
    }

    [Fact]
    public void A_four_byte_argument_sits_at_the_start_of_its_slot()
    {
        var args = new KernelArgs().I32(-1).F32(1.5f);
        Assert.Equal(0xFFFFFFFFUL, args.Values[0]);
        Assert.Equal((ulong)(uint)BitConverter.SingleToInt32Bits(1.5f), args.Values[1]);
    }
}
