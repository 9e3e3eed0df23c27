using System.Diagnostics;
using LoRAHub.Distributed.Launch;
using LoRAHub.Training.Parallel;

namespace LoRAHub.Distributed.Tests;

/// <summary>The parts that need no second process: environment contract, rendezvous store, sharding, launcher supervision.</summary>
public sealed class InProcessTests
{
    private static Func<string, string?> Env(params (string, string)[] vars) => name => vars.FirstOrDefault(v => v.Item1 == name).Item2;

    [Fact]
    public void Torchrun_variables_place_the_rank()
    {
        var e = DistributedEnvironment.FromEnvironment(Env(("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.0.0.2"), ("MASTER_PORT", "29511")));
        Assert.Equal(new DistributedEnvironment(3, 4, 1, 2, "10.0.0.2", 29511), e);
        Assert.True(e.IsDistributed);
        Assert.False(DistributedEnvironment.FromEnvironment(Env()).IsDistributed);
    }

    [Fact]
    public void Mpiexec_variables_give_the_rank_with_the_node_offset()
    {
        var e = DistributedEnvironment.FromEnvironment(Env(("PMI_RANK", "1"), ("PMI_SIZE", "2"), ("LORAHUB_RANK_OFFSET", "0")));
        Assert.Equal((1, 2, 1), (e.Rank, e.WorldSize, e.LocalRank));
    }

    [Fact]
    public void Inconsistent_variables_are_errors_naming_them()
    {
        Assert.Contains("RANK 4 is outside 0..3", Assert.Throws<DistributedException>(() =>
            DistributedEnvironment.FromEnvironment(Env(("RANK", "4"), ("WORLD_SIZE", "4")))).Message);
        Assert.Contains("WORLD_SIZE='two'", Assert.Throws<DistributedException>(() =>
            DistributedEnvironment.FromEnvironment(Env(("WORLD_SIZE", "two")))).Message);
        Assert.Contains("MASTER_PORT 70000", Assert.Throws<DistributedException>(() =>
            DistributedEnvironment.FromEnvironment(Env(("MASTER_PORT", "70000")))).Message);
    }

    [Fact]
    public async Task The_store_hands_values_to_waiting_clients_and_times_out_with_the_key()
    {
        var port = 29100 + Environment.ProcessId % 500;
        using var server = new TcpStore("127.0.0.1", port, isServer: true, TimeSpan.FromSeconds(2));
        using var client = new TcpStore("127.0.0.1", port, isServer: false, TimeSpan.FromSeconds(2));
        var waiting = Task.Run(() => client.Get("id"));
        Thread.Sleep(100);
        Assert.False(waiting.IsCompleted);
        server.Set("id", [1, 2, 3]);
        Assert.Equal([1, 2, 3], await waiting);
        Assert.Null(client.Age("heartbeat/1"));
        client.Set("heartbeat/1", [0]);
        Assert.True(server.Age("heartbeat/1") < TimeSpan.FromSeconds(1));
        Assert.Contains("'never' was not set within 2 s", Assert.Throws<DistributedException>(() => client.Get("never")).Message);
    }

    [Fact]
    public void A_client_without_a_store_names_rank_0_and_the_address()
    {
        var e = Assert.Throws<DistributedException>(() => new TcpStore("127.0.0.1", 1, isServer: false, TimeSpan.FromMilliseconds(300)));
        Assert.Equal(0, e.Rank);
        Assert.Contains("127.0.0.1:1", e.Message);
    }

    [Fact]
    public void Zero_partition_is_contiguous_and_balanced_by_elements()
    {
        var owners = ZeroRedundancyOptimizer.Partition([100, 100, 10, 10, 180, 100, 100], 2);
        Assert.Equal([0, 0, 0, 0, 1, 1, 1], owners);
        Assert.Equal([0, 1, 2, 3], ZeroRedundancyOptimizer.Partition([5, 5, 5, 5], 4));
        Assert.Equal(owners.OrderBy(o => o), owners);
    }

    [Fact]
    public void Bad_launch_options_are_rejected_with_the_fix()
    {
        Assert.Contains("--nproc-per-node", Assert.Throws<ArgumentException>(() => new LaunchOptions { NprocPerNode = 0, Backend = "mpi" }.Validate()).Message);
        Assert.Contains("--node-rank", Assert.Throws<ArgumentException>(() => new LaunchOptions { NprocPerNode = 1, Nnodes = 2, NodeRank = 2, Backend = "nccl" }.Validate()).Message);
        Assert.Contains("mpiexec -hosts", Assert.Throws<ArgumentException>(() => new LaunchOptions { NprocPerNode = 1, Nnodes = 2, Backend = "mpi" }.Validate()).Message);
    }

    private static (int code, string error, TimeSpan elapsed) Shell(string script)
    {
        var error = new StringWriter();
        var clock = Stopwatch.StartNew();
        // Direct launch (what the nccl backend uses), here of plain shell processes.
        var code = RankLauncher.Run(new LaunchOptions { NprocPerNode = 2, Backend = "nccl", KillGrace = TimeSpan.FromSeconds(1) },
            "/bin/sh", ["-c", script], error);
        return (code, error.ToString(), clock.Elapsed);
    }

    [Fact]
    public void The_launcher_sets_torchrun_variables_and_returns_0_when_every_rank_does()
    {
        var (code, error, _) = Shell("test \"$WORLD_SIZE/$LOCAL_WORLD_SIZE/$MASTER_PORT\" = 2/2/29500 && test \"$RANK\" = \"$LOCAL_RANK\"");
        Assert.True(code == 0, error);
    }

    [Fact]
    public void A_failing_rank_stops_the_others_within_the_grace_and_is_named()
    {
        var (code, error, elapsed) = Shell("if [ \"$RANK\" = 1 ]; then exit 3; fi; sleep 60");
        Assert.Equal(RankLauncher.FailureExitCode, code);
        Assert.Contains("rank 1", error);
        Assert.Contains("exited with code 3", error);
        Assert.True(elapsed < TimeSpan.FromSeconds(15), $"took {elapsed}");

        (code, error, elapsed) = Shell("if [ \"$RANK\" = 0 ]; then kill -9 $$; fi; sleep 60");
        Assert.Equal(RankLauncher.FailureExitCode, code);
        Assert.Contains("rank 0", error);
        Assert.Contains("signal 9", error);
        Assert.True(elapsed < TimeSpan.FromSeconds(15), $"took {elapsed}");
    }

    [Fact]
    public void Ranks_stopped_at_ctrl_c_end_the_launch_with_130_and_one_that_is_not_followed_fails_it()
    {
        // Every rank stops at the same step and exits 130 (their own messages say where the checkpoint is): not a failure.
        var (code, error, _) = Shell("if [ \"$RANK\" = 1 ]; then sleep 0.3; fi; exit 130");
        Assert.Equal(RankLauncher.InterruptedExitCode, code);
        Assert.Equal("", error);

        // One rank stopped and another goes on: after the grace period that is a failure, and the other is stopped.
        (code, error, var elapsed) = Shell("if [ \"$RANK\" = 0 ]; then exit 130; fi; sleep 60");
        Assert.Equal(RankLauncher.FailureExitCode, code);
        Assert.Contains("rank 0 stopped at Ctrl+C, but not every other rank ended within 1 s", error);
        Assert.True(elapsed < TimeSpan.FromSeconds(15), $"took {elapsed}");
    }
}
