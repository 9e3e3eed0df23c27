namespace LoRAHub.Tuners;

/// <summary>Building an adapter in steps without leaving a half-built one in the model.</summary>
public static class Adapters
{
    /// <summary>
    /// Runs <paramref name="fill"/> (add an adapter, load weights) on a new adapter and returns it. When it throws, the
    /// adapter is disposed first, which unloads what it had put into the model, so the model is left as it was.
    /// </summary>
    public static TAdapter Build<TAdapter>(TAdapter adapter, Action<TAdapter> fill) where TAdapter : IDisposable
    {
        try
        {
            fill(adapter);
            return adapter;
        }
        catch
        {
            adapter.Dispose();
            throw;
        }
    }
}
