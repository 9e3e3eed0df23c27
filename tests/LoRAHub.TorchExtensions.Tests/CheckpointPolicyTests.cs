namespace LoRAHub.TorchExtensions.Tests;

using static LayerCheckpoint;

/// <summary>Which layers a <see cref="CheckpointPolicy"/> keeps, checkpoints or offloads for given sizes.</summary>
public class CheckpointPolicyTests
{
    [Fact]
    public void Fixed_policies_treat_every_layer_alike()
    {
        Assert.Equal([Keep, Keep, Keep], CheckpointPolicy.None.Plan(3, 100, 10));
        Assert.Equal([Checkpoint, Checkpoint, Checkpoint], CheckpointPolicy.All.Plan(3, 100, 10));
        Assert.Equal([Offload, Offload, Offload], CheckpointPolicy.Offload.Plan(3, 100, 10));
        Assert.Empty(CheckpointPolicy.All.Plan(0, 100, 10));
    }

    [Fact]
    public void A_budget_keeps_as_many_layers_as_fit_then_checkpoints_then_offloads()
    {
        // 8 layers keeping 100 bytes each, or 10 when checkpointed.
        Assert.Equal(Enumerable.Repeat(Keep, 8), CheckpointPolicy.Budget(800).Plan(8, 100, 10));
        // k kept: 100k + 10(8 − k) ≤ 350 → k = 3, the last three.
        Assert.Equal([Checkpoint, Checkpoint, Checkpoint, Checkpoint, Checkpoint, Keep, Keep, Keep], CheckpointPolicy.Budget(350).Plan(8, 100, 10));
        Assert.Equal(Enumerable.Repeat(Checkpoint, 8), CheckpointPolicy.Budget(80).Plan(8, 100, 10));
        // Below 8 inputs: 5 inputs fit on the device, the first three layers are offloaded.
        Assert.Equal([Offload, Offload, Offload, Checkpoint, Checkpoint, Checkpoint, Checkpoint, Checkpoint], CheckpointPolicy.Budget(59).Plan(8, 100, 10));
        Assert.Equal(Enumerable.Repeat(Offload, 8), CheckpointPolicy.Budget(0).Plan(8, 100, 10));
        // Without offload the least it can do is checkpoint everything.
        Assert.Equal(Enumerable.Repeat(Checkpoint, 8), CheckpointPolicy.Budget(59, allow_offload: false).Plan(8, 100, 10));
    }

    [Fact]
    public void Llama_7b_at_2x2048_in_bf16_keeps_six_layers_within_4_GiB()
    {
        const long tokens = 2 * 2048;
        var kept = CheckpointPolicy.DecoderLayerActivationBytes(tokens, 4096, 4096, 11008, 32, 2);
        // Per token (6·4096 + 2·4096 + 3·11008)·2 bytes + 32 heads' fp32 log-sum-exp + two fp32 norm factors.
        Assert.Equal(tokens * ((6 * 4096 + 2 * 4096 + 3 * 11008) * 2 + 32 * 4 + 8), kept);
        // An MLP run in token chunks keeps only its input: gate, up and their product are not counted.
        Assert.Equal(tokens * ((6 * 4096 + 2 * 4096) * 2 + 32 * 4 + 8), CheckpointPolicy.DecoderLayerActivationBytes(tokens, 4096, 4096, 11008, 32, 2, mlp_chunked: true));
        var input = CheckpointPolicy.LayerInputBytes(tokens, 4096, 2);
        Assert.Equal(32L << 20, input);
        // (4 GiB − 32 inputs of 32 MiB) / (kept − input) = 6.37: six kept, 26 checkpointed.
        var plan = CheckpointPolicy.Budget(4L << 30).Plan(32, kept, input);
        Assert.Equal(26, plan.Count(p => p == Checkpoint));
        Assert.Equal(6, plan.Count(p => p == Keep));
        Assert.All(plan[26..], p => Assert.Equal(Keep, p));
        // 512 MiB holds 16 inputs: the first 16 layers are offloaded.
        var tight = CheckpointPolicy.Budget(512L << 20).Plan(32, kept, input);
        Assert.Equal(16, tight.Count(p => p == Offload));
        Assert.All(tight[..16], p => Assert.Equal(Offload, p));
    }

    [Fact]
    public void Pinned_buffers_come_in_size_classes_of_eighths_of_a_power_of_two()
    {
        Assert.Equal(64 << 10, Cuda.PinnedHostPool.SizeClass(1));
        Assert.Equal(8L << 20, Cuda.PinnedHostPool.SizeClass(8L << 20)); // a power of two is its own class
        Assert.Equal(9L << 20, Cuda.PinnedHostPool.SizeClass((8L << 20) + 1));
        Assert.Equal(18L << 20, Cuda.PinnedHostPool.SizeClass((17L << 20) + 5));
        for (long b = 100_000; b < 1L << 34; b = b * 7 / 3)
        {
            var c = Cuda.PinnedHostPool.SizeClass(b);
            Assert.InRange(c, b, b + b / 8);
        }
    }

    [Fact]
    public void Policies_parse_from_text()
    {
        Assert.Same(CheckpointPolicy.None, CheckpointPolicy.Parse("none"));
        Assert.Same(CheckpointPolicy.All, CheckpointPolicy.Parse("all"));
        Assert.Same(CheckpointPolicy.Offload, CheckpointPolicy.Parse("Offload"));
        var b = CheckpointPolicy.Parse("budget:12GiB");
        Assert.Equal(12L << 30, b.BudgetBytes);
        Assert.True(b.AllowOffload);
        var n = CheckpointPolicy.Parse("budget:1.5MiB,no-offload");
        Assert.Equal(3L << 19, n.BudgetBytes);
        Assert.False(n.AllowOffload);
        Assert.Equal("budget:1572864,no-offload", n.ToString());
    }

    [Fact]
    public void Bad_input_gives_a_clear_error()
    {
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => CheckpointPolicy.Budget(-1));
        Assert.Contains("zero or more bytes", e.Message);
        Assert.Contains("CheckpointPolicy.None", e.Message);
        Assert.Contains("zero or more bytes", Assert.Throws<ArgumentOutOfRangeException>(() => CheckpointPolicy.Parse("budget:-2GiB")).Message);
        Assert.Contains("expected none, all, offload", Assert.Throws<FormatException>(() => CheckpointPolicy.Parse("sometimes")).Message);
        Assert.Contains("not a size", Assert.Throws<FormatException>(() => CheckpointPolicy.Parse("budget:lots")).Message);
        Assert.Throws<ArgumentOutOfRangeException>(() => CheckpointPolicy.All.Plan(-1, 100, 10));
        Assert.Throws<ArgumentOutOfRangeException>(() => CheckpointPolicy.All.Plan(2, -100, 10));
    }
}
