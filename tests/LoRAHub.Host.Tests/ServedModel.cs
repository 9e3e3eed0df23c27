using System.Text;
using System.Text.Json;
using LoRAHub.Host.Everyday;
using LoRAHub.Host.Serving;
using Microsoft.Extensions.Logging.Abstractions;

namespace LoRAHub.Host.Tests;

/// <summary>
/// What the serve tests drive: a server on loopback over a fresh load of the embedded model, its adapter hub (with the
/// fixture's adapters "a" and "b" where asked) and an HTTP client pointed at it. Disposed in the reverse order.
/// </summary>
internal sealed class ServedModel : IAsyncDisposable
{
    private ServedModel(LoadedModel model, AdapterHub hub)
    {
        Model = model;
        Hub = hub;
    }

    public LoadedModel Model { get; }
    public AdapterHub Hub { get; }
    public OpenAiServer Server { get; private set; } = null!;
    public HttpClient Client { get; } = new() { Timeout = TimeSpan.FromSeconds(60) };

    public static async Task<ServedModel> StartAsync(EmbeddedModelFixture fixture, ServeOptions options, int maxLoaded = 8, bool withAdapters = false)
    {
        var model = LoadedModel.Load(fixture.BaseModel);
        var served = new ServedModel(model, new AdapterHub(model.Model, fixture.Methods, maxLoaded));
        if (withAdapters)
        {
            served.Hub.Register("a", fixture.AdapterA);
            served.Hub.Register("b", fixture.AdapterB);
        }
        served.Server = await OpenAiServer.StartAsync(model, served.Hub, options, NullLoggerFactory.Instance);
        served.Client.BaseAddress = new Uri(served.Server.Address);
        return served;
    }

    /// <summary>A JSON request body.</summary>
    public static StringContent Body(object body) => new(JsonSerializer.Serialize(body), Encoding.UTF8, "application/json");

    public async ValueTask DisposeAsync()
    {
        await Server.DisposeAsync();
        Hub.Dispose();
        Model.Dispose();
        Client.Dispose();
    }
}
