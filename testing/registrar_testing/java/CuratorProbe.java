import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import org.apache.curator.framework.CuratorFramework;
import org.apache.curator.framework.CuratorFrameworkFactory;
import org.apache.curator.retry.RetryNTimes;
import org.apache.curator.x.discovery.ServiceDiscovery;
import org.apache.curator.x.discovery.ServiceDiscoveryBuilder;
import org.apache.curator.x.discovery.ServiceInstance;
import org.apache.curator.x.discovery.ServiceType;
import org.apache.curator.x.discovery.UriSpec;

/**
 * Sees service registrations the way a Java Apache Curator x-discovery client
 * does (ServiceDiscovery with its default JsonInstanceSerializer), so tests can
 * prove that Java clients read what the registrar writes.
 *
 * <pre>
 * CuratorProbe list     CONNECT BASE_PATH SERVICE
 *     one JSON line per instance, as Curator parsed it (unparseable: exit 3)
 * CuratorProbe names    CONNECT BASE_PATH
 *     one JSON line: the service names under BASE_PATH
 * CuratorProbe register CONNECT BASE_PATH SERVICE ID ADDRESS PORT [PAYLOAD_JSON] [HOLD_SECONDS]
 *     registers a DYNAMIC (ephemeral) instance with Curator itself, prints
 *     {"path": ..., "znode": <the JSON Curator wrote>}, then holds the session
 *     until stdin closes (at most HOLD_SECONDS, default 120) and unregisters.
 * </pre>
 */
public final class CuratorProbe {
    private static final ObjectMapper MAPPER = new ObjectMapper();

    public static void main(String[] args) throws Exception {
        if (args.length < 3 || (!args[0].equals("names") && args.length < 4)) {
            System.err.println("usage: CuratorProbe list|names|register CONNECT BASE_PATH [SERVICE ...]");
            System.exit(64);
        }
        CuratorFramework client = CuratorFrameworkFactory.builder()
                .connectString(args[1]).sessionTimeoutMs(10_000).connectionTimeoutMs(5_000)
                .retryPolicy(new RetryNTimes(3, 200)).build();
        client.start();
        try {
            if (!client.blockUntilConnected(10, TimeUnit.SECONDS)) {
                System.err.println("CuratorProbe: no connection to " + args[1]);
                System.exit(2);
            }
            // watchInstances(false): registering then needs no curator-recipes (CuratorCache).
            try (ServiceDiscovery<Object> discovery = ServiceDiscoveryBuilder.builder(Object.class)
                    .client(client).basePath(args[2]).watchInstances(false).build()) {
                discovery.start();
                switch (args[0]) {
                    case "list" -> list(discovery, args[3]);
                    case "names" -> System.out.println(MAPPER.writeValueAsString(discovery.queryForNames()));
                    case "register" -> register(client, discovery, args);
                    default -> {
                        System.err.println("CuratorProbe: unknown command " + args[0]);
                        System.exit(64);
                    }
                }
            }
        } finally {
            client.close();
        }
    }

    private static void list(ServiceDiscovery<Object> discovery, String service) throws Exception {
        try {
            for (ServiceInstance<Object> i : discovery.queryForInstances(service)) {
                Map<String, Object> out = new LinkedHashMap<>();
                out.put("name", i.getName());
                out.put("id", i.getId());
                out.put("address", i.getAddress());
                out.put("port", i.getPort());
                out.put("sslPort", i.getSslPort());
                out.put("payload", i.getPayload());
                out.put("registrationTimeUTC", i.getRegistrationTimeUTC());
                out.put("serviceType", i.getServiceType());
                out.put("enabled", i.isEnabled());
                out.put("uri", i.getUriSpec() == null ? null : i.buildUriSpec());
                System.out.println(MAPPER.writeValueAsString(out));
            }
        } catch (IOException e) {  // Jackson could not read a znode
            System.err.println("CuratorProbe: cannot deserialize: " + e);
            System.exit(3);
        }
    }

    private static void register(CuratorFramework client, ServiceDiscovery<Object> discovery,
                                 String[] args) throws Exception {
        if (args.length < 7) {
            System.err.println("usage: CuratorProbe register CONNECT BASE_PATH SERVICE ID ADDRESS PORT [PAYLOAD_JSON] [HOLD_SECONDS]");
            System.exit(64);
        }
        Object payload = args.length > 7 && !args[7].isEmpty() ? MAPPER.readValue(args[7], Map.class) : null;
        long holdMs = 1000L * (args.length > 8 ? Long.parseLong(args[8]) : 120);
        ServiceInstance<Object> instance = ServiceInstance.builder()
                .name(args[3]).id(args[4]).address(args[5]).port(Integer.parseInt(args[6]))
                .payload(payload).serviceType(ServiceType.DYNAMIC)
                .uriSpec(new UriSpec("{scheme}://{address}:{port}")).build();
        discovery.registerService(instance);
        String path = args[2] + "/" + args[3] + "/" + args[4];
        Map<String, Object> out = new LinkedHashMap<>();
        out.put("path", path);
        out.put("znode", MAPPER.readTree(client.getData().forPath(path)));
        System.out.println(MAPPER.writeValueAsString(out));
        System.out.flush();
        StdinHold.untilEof(holdMs);
        // ServiceDiscovery.close() (try-with-resources) deletes the instance.
    }
}
