import java.io.IOException;

/** What CuratorProbe and CuratorCacheWatch share: hold until the test closes our stdin. */
final class StdinHold {
    private StdinHold() {
    }

    /** Return once stdin reaches EOF (the Python side closed it) or after holdMs. */
    static void untilEof(long holdMs) throws InterruptedException {
        Thread stdin = new Thread(() -> {
            try {
                while (System.in.read() != -1) {
                    // drain until EOF
                }
            } catch (IOException ignored) {
                // EOF or closed: stop holding
            }
        });
        stdin.setDaemon(true);
        stdin.start();
        stdin.join(holdMs);
    }
}
