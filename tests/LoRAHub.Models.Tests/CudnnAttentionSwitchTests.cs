using LoRAHub.TorchExtensions;

namespace LoRAHub.Models.Tests;

/// <summary>
/// libtorch's cuDNN attention switch is process-wide, and packed attention turns it off around its calls: this test runs
/// alone, or a packed forward in another class flips the switch between its set and its read.
/// </summary>
[Collection(RunsAlone.Name)]
public sealed class CudnnAttentionSwitchTests
{
    [Fact]
    public void The_cudnn_attention_switch_is_found_and_restored()
    {
        Assert.True(torchx.backends.cuda.cudnn_sdp_available, "at::Context's cuDNN SDPA switch was not found in the loaded libtorch_cpu");
        var before = torchx.backends.cuda.cudnn_sdp_enabled();
        using (torchx.backends.cuda.without_cudnn_sdp()) Assert.False(torchx.backends.cuda.cudnn_sdp_enabled());
        Assert.Equal(before, torchx.backends.cuda.cudnn_sdp_enabled());
        torchx.backends.cuda.enable_cudnn_sdp(!before);
        Assert.Equal(!before, torchx.backends.cuda.cudnn_sdp_enabled());
        torchx.backends.cuda.enable_cudnn_sdp(before);
    }
}
