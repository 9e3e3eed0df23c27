using LoRAHub.Host.Scripting;
using LoRAHub.Training;

namespace LoRAHub.Host.Tests;

/// <summary>
/// Ctrl+C during `run`: while training follows the token, the first press asks for a graceful stop and says so and the
/// second lets the process end; with nothing following it, the first press ends the process.
/// </summary>
[Collection(nameof(ConsoleCancellationTests))]
public sealed class ConsoleCancellationTests
{
    [Fact]
    public void The_first_press_cancels_and_says_so_the_second_lets_the_process_end()
    {
        var error = new StringWriter();
        using var ctrlC = new ConsoleCancellation(error);
        Assert.False(ctrlC.Token.IsCancellationRequested);

        using (TrainingCancellation.Follow())
        {
            Assert.True(ctrlC.Press());   // e.Cancel = true: the process lives on
            Assert.True(ctrlC.Token.IsCancellationRequested);
            Assert.False(ctrlC.Press());  // e.Cancel = false: Ctrl+C ends the process as usual
        }

        Assert.Equal(ConsoleCancellation.StoppingMessage + Environment.NewLine, error.ToString());
    }

    [Fact]
    public void A_press_while_nothing_follows_the_token_lets_the_process_end()
    {
        var error = new StringWriter();
        using var ctrlC = new ConsoleCancellation(error);
        var follower = TrainingCancellation.Follow();
        follower.Dispose();
        follower.Dispose(); // once only

        Assert.False(TrainingCancellation.Following);
        Assert.False(ctrlC.Press());
        Assert.False(ctrlC.Token.IsCancellationRequested);
        Assert.Equal("", error.ToString());
    }
}

/// <summary>Runs alone: <see cref="TrainingCancellation.Following"/> is process-wide, and other tests train scripts.</summary>
[CollectionDefinition(nameof(ConsoleCancellationTests), DisableParallelization = true)]
public sealed class ConsoleCancellationCollection;
