using LoRAHub.Models.Llama;

namespace LoRAHub.Models.Tests;

using static LayerCheckpoint;

/// <summary>The model's per-layer checkpoint choice (<see cref="CheckpointPolicy"/>) and that any mix of choices trains alike.</summary>
public class CheckpointPolicyModelTests
{
    [Fact]
    public void The_policy_decides_each_layer_and_gradient_checkpointing_still_means_all()
    {
        using var model = TinyModels.Llama();
        var ids = TinyModels.Ids(new long[,] { { 1, 2, 3, 4, 5, 6 } });
        Assert.Equal([Keep, Keep], model.CheckpointPlan(ids));
        model.GradientCheckpointing = true;
        Assert.Equal([Checkpoint, Checkpoint], model.CheckpointPlan(ids));
        using (torch.no_grad()) Assert.Equal([Keep, Keep], model.CheckpointPlan(ids)); // nothing to save without grad

        // 6 tokens, hidden 32, k/v 2 heads × 8, intermediate 64, 4 heads, fp32.
        var kept = CheckpointPolicy.DecoderLayerActivationBytes(6, 32, 16, 64, 4, 4);
        var input = CheckpointPolicy.LayerInputBytes(6, 32, 4);
        model.CheckpointPolicy = CheckpointPolicy.Budget(kept + input);
        Assert.Equal([Checkpoint, Keep], model.CheckpointPlan(ids)); // the policy wins over GradientCheckpointing
        model.CheckpointPolicy = CheckpointPolicy.Budget(input);
        Assert.Equal([Offload, Checkpoint], model.CheckpointPlan(ids));
        model.CheckpointPolicy = CheckpointPolicy.Budget(2 * kept);
        Assert.Equal([Keep, Keep], model.CheckpointPlan(ids));
        ICausalLanguageModel asInterface = model;
        asInterface.CheckpointPolicy = CheckpointPolicy.Offload;
        Assert.Same(CheckpointPolicy.Offload, model.CheckpointPolicy);
    }

    [Fact]
    public void A_mixed_plan_gives_the_gradients_of_no_checkpointing()
    {
        using var model = TinyModels.Llama();
        var ids = TinyModels.Ids(new long[,] { { 1, 2, 3, 4, 5, 6 }, { 7, 8, 9, 10, 11, 12 } });
        Dictionary<string, Tensor> Grads()
        {
            foreach (var p in model.parameters()) p.grad = null;
            using (var loss = model.ComputeLoss(ids, ids)) loss.backward();
            return model.named_parameters().ToDictionary(p => p.name, p => p.parameter.grad!.clone());
        }
        var plain = Grads();
        model.CheckpointPolicy = CheckpointPolicy.Budget(CheckpointPolicy.LayerInputBytes(12, 32, 4)); // [Offload, Checkpoint]
        var mixed = Grads();
        foreach (var (name, g) in plain)
            Assert.True(TinyModels.MaxAbsDiff(g, mixed[name]) < 1e-6f, $"{name} differs under the mixed plan");
    }

    [Fact]
    public void A_mixture_of_experts_with_its_router_loss_refuses_a_policy_that_checkpoints()
    {
        var config = TinyModels.LlamaConfig("mixtral");
        config.NumLocalExperts = 4;
        config.HeadDimOverride = 8;
        using var model = LlamaForCausalLM.CreateRandom(config, ScalarType.Float32, TinyModels.Device, 0);
        model.train();
        Assert.True(model.AddsRouterAuxLoss);
        var ids = TinyModels.Ids(new long[,] { { 1, 2, 3, 4 } });
        model.CheckpointPolicy = CheckpointPolicy.Budget(0);
        var e = Assert.Throws<NotSupportedException>(() => model.ComputeLoss(ids, ids));
        Assert.Contains("router load-balancing loss", e.Message);
        Assert.Contains("budget:0", e.Message);
        model.CheckpointPolicy = CheckpointPolicy.None;
        using var loss = model.ComputeLoss(ids, ids);
        Assert.True(float.IsFinite(loss.item<float>()));
    }

    [Fact]
    public void A_model_without_per_layer_control_takes_none_or_all()
    {
        using var gpt2 = TinyModels.Gpt2();
        ICausalLanguageModel model = gpt2;
        model.CheckpointPolicy = CheckpointPolicy.All;
        Assert.True(model.GradientCheckpointing);
        model.CheckpointPolicy = CheckpointPolicy.None;
        Assert.False(model.GradientCheckpointing);
        var e = Assert.Throws<NotSupportedException>(() => model.CheckpointPolicy = CheckpointPolicy.Budget(1 << 20));
        Assert.Contains("none or all", e.Message);
    }
}
