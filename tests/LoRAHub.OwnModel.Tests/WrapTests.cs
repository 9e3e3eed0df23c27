using static LoRAHub.OwnModel.Tests.Helpers;

namespace LoRAHub.OwnModel.Tests;

/// <summary>What TorchSharpModel.Wrap reports about a user's model, and the errors a user meets.</summary>
public class WrapTests
{
    [Fact]
    public void Device_and_dtype_come_from_the_parameters_unless_given()
    {
        using var model = UserModel.Mlp.Build(0, CPU);
        var wrapped = TorchSharpModel.Wrap(model);
        Assert.Same(model, wrapped.Root);
        Assert.Equal(DeviceType.CPU, wrapped.Device.type);
        Assert.Equal(ScalarType.Float32, wrapped.DType);
        Assert.Equal("Sequential", wrapped.NameOrPath);
        Assert.Equal("sequential", wrapped.ModelType);
        Assert.Empty(wrapped.OutputModuleNames);

        // Read at each call: a cast shows through.
        model.to(ScalarType.Float64);
        Assert.Equal(ScalarType.Float64, wrapped.DType);

        var given = TorchSharpModel.Wrap(model, CPU, ScalarType.BFloat16, "me/mlp", "llama", ["out"]);
        Assert.Equal(ScalarType.BFloat16, given.DType);
        Assert.Equal("me/mlp", given.NameOrPath);
        Assert.Equal("llama", given.ModelType);
        Assert.Equal(["out"], given.OutputModuleNames);
    }

    [Fact]
    public void An_output_module_that_is_not_in_the_model_is_refused()
    {
        using var model = UserModel.Mlp.Build(0, CPU);
        var e = Assert.Throws<ArgumentException>(() => TorchSharpModel.Wrap(model, outputModules: ["lm_head"]));
        Assert.Contains("lm_head", e.Message);
        Assert.Contains("fc1, act1, fc2, act2, out", e.Message);
    }

    [Fact]
    public void All_linear_adapts_every_linear_but_the_output_head()
    {
        using var model = UserModel.Transformer.Build(0, CPU);
        using var adapter = (LoraAdapter)new LoraMethod().Attach(TorchSharpModel.Wrap(model, outputModules: ["head"]),
            new { r = 2, target_modules = "all-linear" });
        var expected = from layer in new[] { 0, 1 }
                       from path in new[] { "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc1", "mlp.fc2" }
                       select $"blocks.{layer}.{path}";
        Assert.Equal(expected.Order(), adapter.Layers.Keys.Order());
        Assert.IsType<Linear>(model.get_submodule("head"));
    }

    [Fact]
    public void A_custom_model_must_name_its_targets_and_is_told_which_linears_it_has()
    {
        using var model = UserModel.Transformer.Build(0, CPU);
        var e = Assert.Throws<AdapterConfigurationException>(() => new LoraMethod().Attach(TorchSharpModel.Wrap(model), new { r = 4 }));
        Assert.Contains("target_modules", e.Message);
        Assert.Contains("tinytransformer", e.Message);
        Assert.Contains("q_proj", e.Message);
        Assert.DoesNotContain(model.named_modules(), m => m.module is LoraLinear);
    }

    /// <summary>A Linear held in a field typed Linear cannot hold a LoRA layer: the error says how to declare it.</summary>
    [Theory]
    [InlineData("lora")]
    [InlineData("dora")]
    public void A_field_typed_linear_gives_an_error_naming_the_field_and_the_fix(string method)
    {
        using var model = new FixedFieldModel();
        var e = Assert.ThrowsAny<Exception>(() => Method(method).Attach(TorchSharpModel.Wrap(model), new { r = 2, target_modules = new[] { "swappable", "proj" } }));
        Assert.Contains("FixedFieldModel.proj", e.Message);
        Assert.Contains("Module<Tensor, Tensor>", e.Message);
        // Nothing is left half-adapted: the layer wrapped before the failure is put back.
        Assert.IsType<Linear>(model.get_submodule("swappable"));
        Assert.IsType<Linear>(model.get_submodule("proj"));
    }

    [Fact]
    public void The_default_attention_is_causal_sdpa()
    {
        torchx.manual_seed(3);
        var (q, k, v) = (randn(2, 4, 5, 8), randn(2, 4, 5, 8), randn(2, 4, 5, 8));
        using var model = UserModel.Mlp.Build(0, CPU);
        var ours = TorchSharpModel.Wrap(model).Attention(q, k, v, null);
        var reference = nn.functional.scaled_dot_product_attention(q, k, v, is_casual: true);
        Assert.True(ours.allclose(reference, 1e-5, 1e-6));
        // With padding: real keys only, causal.
        var mask = tensor(new[,] { { true, true, true, true, true }, { true, true, true, false, false } });
        var padded = TorchSharpModel.Wrap(model).Attention(q, k, v, mask);
        Assert.True(padded[0].allclose(reference[0], 1e-5, 1e-6));
        Assert.True(padded[1, .., ..3].allclose(nn.functional.scaled_dot_product_attention(q[1.., .., ..3], k[1.., .., ..3], v[1.., .., ..3], is_casual: true)[0], 1e-5, 1e-6));
    }

    private sealed class FixedFieldModel : nn.Module<Tensor, Tensor>
    {
        private nn.Module<Tensor, Tensor> swappable;
        private readonly Linear proj;

        public FixedFieldModel() : base(nameof(FixedFieldModel))
        {
            swappable = nn.Linear(4, 4);
            proj = nn.Linear(4, 4);
            RegisterComponents();
        }

        public override Tensor forward(Tensor x) => proj.call(swappable.call(x));
    }
}
