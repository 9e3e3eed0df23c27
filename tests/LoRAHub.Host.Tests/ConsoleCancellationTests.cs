using LoRAHub.Host.Scripting;

namespace LoRAHub.Host.Tests;

/// <summary>Ctrl+C during `run`: the first press asks for a graceful stop and says so, the second lets the process end.</summary>
public sealed class ConsoleCancellationTests
{
    [Fact]
    public void The_first_press_cancels_and_says_so_the_second_lets_the_process_end()
    {
        var error = new StringWriter();
        using var ctrlC = new ConsoleCancellation(error);
        Assert.False(ctrlC.Token.IsCancellationRequested);

        Assert.True(ctrlC.Press());   // e.Cancel = true: the process lives on
        Assert.True(ctrlC.Token.IsCancellationRequested);
        Assert.False(ctrlC.Press());  // e.Cancel = false: Ctrl+C ends the process as usual

        Assert.Equal(ConsoleCancellation.StoppingMessage + Environment.NewLine, error.ToString());
    }
}
