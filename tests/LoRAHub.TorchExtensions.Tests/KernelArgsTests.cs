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

    [Fact]
    public void A_struct_takes_consecutive_slots_as_one_argument()
    {
        var args = new KernelArgs().I32(7).Struct(1, 2, KernelArgs.Pair(3, -4)).Ptr(5);
        Assert.Equal(3, args.Count);
        Assert.Equal(5, args.Slots);
        Assert.Equal([0, 1, 4], new[] { args.Start(0), args.Start(1), args.Start(2) });
        Assert.Equal([7UL, 1UL, 2UL, 3UL | 0xFFFFFFFC00000000UL, 5UL], args.Values.Take(5));
        Assert.Equal((ulong)(uint)BitConverter.SingleToInt32Bits(1f) | (ulong)(uint)BitConverter.SingleToInt32Bits(2f) << 32,
            KernelArgs.Pair(1f, 2f));
        Assert.Throws<ArgumentException>(() => new KernelArgs().Struct());
        var full = new KernelArgs().Struct(new ulong[KernelArgs.MaxCount - 1]);
        Assert.Throws<ArgumentException>(() => full.Struct(1, 2));
    }
}
