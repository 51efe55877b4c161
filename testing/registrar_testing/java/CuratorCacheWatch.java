import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.time.Instant;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import org.apache.curator.framework.CuratorFramework;
import org.apache.curator.framework.CuratorFrameworkFactory;
import org.apache.curator.framework.state.ConnectionState;
import org.apache.curator.retry.RetryNTimes;
import org.apache.curator.x.discovery.ServiceCache;
import org.apache.curator.x.discovery.ServiceDiscovery;
import org.apache.curator.x.discovery.ServiceDiscoveryBuilder;
import org.apache.curator.x.discovery.ServiceInstance;
import org.apache.curator.x.discovery.details.ServiceCacheListener;

/**
 * Watches one service the way a Java application does: a Curator
 * {@code ServiceCache} (Curator's default JsonInstanceSerializer), one per
 * payload class named, all in this one JVM on one ZooKeeper session.
 *
 * <pre>
 * CuratorCacheWatch CONNECT BASE_PATH SERVICE CLASS[,CLASS...] [HOLD_SECONDS]
 *     CLASS: Object, Map or Void, the class given to ServiceDiscoveryBuilder.builder().
 *     Prints one JSON line per cache, flushed, when the cache has started
 *       {"t_us": ..., "cache": "Void", "event": "started", "instances": [...]}
 *     and one per change the cache reports (ServiceCacheListener.cacheChanged)
 *       {"t_us": ..., "cache": "Void", "event": "changed", "instances": [...]}
 *     each instance as {"id", "address", "port", "payload"}; "t_us" is the
 *     wall clock in microseconds when the listener ran. Then {"event": "ready"}
 *     once every cache has started. Runs until stdin closes (at most
 *     HOLD_SECONDS, default 120).
 * </pre>
 */
public final class CuratorCacheWatch {
    private static final ObjectMapper MAPPER = new ObjectMapper();

    public static void main(String[] args) throws Exception {
        if (args.length < 4) {
            System.err.println("usage: CuratorCacheWatch CONNECT BASE_PATH SERVICE CLASS[,CLASS...] [HOLD_SECONDS]");
            System.exit(64);
        }
        long holdMs = 1000L * (args.length > 4 ? Long.parseLong(args[4]) : 120);
        CuratorFramework client = CuratorFrameworkFactory.builder()
                .connectString(args[0]).sessionTimeoutMs(10_000).connectionTimeoutMs(5_000)
                .retryPolicy(new RetryNTimes(3, 200)).build();
        client.start();
        List<AutoCloseable> open = new ArrayList<>();
        try {
            if (!client.blockUntilConnected(10, TimeUnit.SECONDS)) {
                System.err.println("CuratorCacheWatch: no connection to " + args[0]);
                System.exit(2);
            }
            for (String name : args[3].split(",")) {
                open.addAll(watch(client, args[1], args[2], name));
            }
            emit(event(null, "ready", null));
            StdinHold.untilEof(holdMs);
        } finally {
            for (int i = open.size() - 1; i >= 0; i--) {
                open.get(i).close();
            }
            client.close();
        }
    }

    /** A discovery and its started cache for one payload class (closed in reverse order). */
    private static List<AutoCloseable> watch(CuratorFramework client, String base, String service,
                                             String name) throws Exception {
        Class<?> payload = switch (name) {
            case "Object" -> Object.class;
            case "Map" -> Map.class;
            case "Void" -> Void.class;
            default -> {
                System.err.println("CuratorCacheWatch: unknown payload class " + name);
                System.exit(64);
                yield null;
            }
        };
        ServiceDiscovery<?> discovery = ServiceDiscoveryBuilder.builder(payload)
                .client(client).basePath(base).build();
        discovery.start();
        ServiceCache<?> cache = discovery.serviceCacheBuilder().name(service).build();
        cache.addListener(new ServiceCacheListener() {
            @Override
            public void cacheChanged() {
                emit(event(name, "changed", cache.getInstances()));
            }

            @Override
            public void stateChanged(CuratorFramework c, ConnectionState state) {
                emit(event(name, "state " + state, null));
            }
        });
        cache.start();
        emit(event(name, "started", cache.getInstances()));
        return List.of(discovery, cache);
    }

    private static Map<String, Object> event(String cache, String what,
                                             List<? extends ServiceInstance<?>> instances) {
        Instant now = Instant.now();
        Map<String, Object> out = new LinkedHashMap<>();
        out.put("t_us", now.getEpochSecond() * 1_000_000L + now.getNano() / 1_000);
        if (cache != null) {
            out.put("cache", cache);
        }
        out.put("event", what);
        if (instances != null) {
            List<Map<String, Object>> list = new ArrayList<>();
            for (ServiceInstance<?> i : instances) {
                Map<String, Object> one = new LinkedHashMap<>();
                one.put("id", i.getId());
                one.put("address", i.getAddress());
                one.put("port", i.getPort());
                one.put("payload", i.getPayload());
                list.add(one);
            }
            out.put("instances", list);
        }
        return out;
    }

    private static synchronized void emit(Map<String, Object> line) {
        try {
            System.out.println(MAPPER.writeValueAsString(line));
        } catch (IOException e) {
            System.out.println("{\"event\": \"unprintable\"}");
        }
        System.out.flush();
    }
}
